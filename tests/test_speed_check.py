"""The local preset priced at the machine's speed of the moment (``bench.speed_check``): the
scaling is exact on every price and leaves the rest alone, and the check compares the
calibration mix's real steps with the preset's model for them."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace as NS

import pytest

from bench.generators import make_workload
from bench.presets import StepModel, a800_qwen25_14b, make_preset, shape_key
from bench.run import run_sim
from bench.speed_check import SpeedCheck
from tests.conftest import TINY_ENGINE, lively_params
from tokencake.buckets import StepBuckets
from tokencake.models.config import tiny_config
from tokencake.models.tokenizer import Tokenizer


def _chunk(start: int, n: int) -> NS:
    return NS(start=start, num_tokens=n, request=NS(num_prompt_tokens=start + n))


def test_scaled_step_model_multiplies_every_price_and_not_the_idle_quantum():
    b = StepBuckets(page_size=16, max_model_len=1000, max_num_seqs=16, max_prefill_chunk=256,
                    max_prefill_seqs=2)  # fmt: skip
    low = {shape_key(sh): 0.01 * (i + 1) for i, sh in enumerate(b.shapes())}
    full = {k: 3 * v for k, v in low.items()}
    m = StepModel(a=1, b=2, c=3, d=4, e=5, m0=6, shape_s=low, shape_full_s=full, buckets=b,
                  overhead=0.5, overhead_row=0.25, overhead_ctx=1e-3, idle=7e-3)  # fmt: skip
    plans = [
        NS(chunks=[_chunk(100, 1), _chunk(300, 1)]),
        NS(chunks=[_chunk(900, 100), _chunk(0, 1), _chunk(40, 1)]),
        NS(chunks=[_chunk(0, 256)]),
    ]
    fast = m.scaled(0.8)
    for plan in plans:
        assert fast.step_time(plan) == pytest.approx(0.8 * m.step_time(plan))
    assert fast.step_time(NS(chunks=[])) == m.idle == 7e-3
    # without a shape table the linear model prices the step: its terms scale too
    lin = dataclasses.replace(m, shape_s={}, shape_full_s={}, buckets=None)
    for plan in plans:
        assert lin.scaled(1.25).step_time(plan) == pytest.approx(1.25 * lin.step_time(plan))


def test_preset_at_speed_keeps_pool_and_copies_and_refuses_a_bad_factor():
    p = a800_qwen25_14b()
    slow = p.at_speed(1.5)
    assert slow.step.c == pytest.approx(1.5 * p.step.c)
    assert (slow.num_blocks, slow.bandwidth, slow.block_size) == (
        p.num_blocks, p.bandwidth, p.block_size,
    )  # fmt: skip
    assert slow.cost_model().copy_time(8, "h2d") == p.cost_model().copy_time(8, "h2d")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="speed factor"):
            p.at_speed(bad)
    # the same workload on a machine half as fast takes longer, all else equal
    wl = make_workload("multi_turn", num_apps=3, arrival_rate=1.0, seed=2)
    t1 = run_sim(wl, "tokencake", p)[0]["total_e2e_s"]
    t2 = run_sim(wl, "tokencake", p.at_speed(2.0))[0]["total_e2e_s"]
    assert t1 < t2


def test_the_check_times_the_calibration_mix_against_the_presets_model():
    """SpeedCheck runs bench.calibrate's mix on its own engine and compares the measured
    steps with the preset's model for the same steps, relative to the calibration day's
    comparison: prices ten times the tiny model's real cost read as a machine ten times
    faster, and a preset without a calibration record is refused by name."""
    cfg = tiny_config(max_position_embeddings=2048)  # the mix's prompts reach 1,000 tokens
    model = (cfg, lively_params(cfg), Tokenizer.byte_level_for_tests())
    eng_kw = {**TINY_ENGINE, "max_model_len": 2048, "max_num_batched_tokens": 256,
              "max_prefill_chunk": 256}  # fmt: skip
    chk = None
    for bucket_pages in (True, False):
        b = StepBuckets(16, 2048, eng_kw["max_num_seqs"], 256, eng_kw["max_prefill_seqs"],
                        bucket_pages=bucket_pages)  # fmt: skip
        table = {shape_key(sh): 1.0 for sh in b.shapes()}
        step = StepModel(a=0, b=0, c=0, d=0, e=0, shape_s=table, buckets=b)
        base = make_preset("local")
        notes = {"calibration": {"total_time_pred_vs_meas": 1.0}}
        preset = dataclasses.replace(base, step=step, notes=notes)
        try:
            chk = SpeedCheck(preset, eng_kw, model)
            break
        except KeyError:  # the engine resolved the other page bucketing
            continue
    assert chk is not None
    try:
        first = chk.measure()
        # one second a call is far more than the tiny model's calls take: a fast machine
        assert 0 < first < 0.5
        # the calibration day's own comparison scales the factor
        chk.calibrated_pred_vs_meas = 2.0
        assert 0 < chk.measure() < 1.0
    finally:
        chk.close()
    with pytest.raises(ValueError, match="no calibration"):
        SpeedCheck(dataclasses.replace(preset, notes={}), eng_kw, model)
