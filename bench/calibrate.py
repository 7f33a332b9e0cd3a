"""Calibrate the ``local`` simulator preset from real engine steps on this machine.

    python -m bench.calibrate [--out bench/local_preset.json] [--num-pages 161]

Prices every compiled step shape of the real-engine run settings on its own
(``diagnostics.time_shapes``, interleaved rounds), then runs a fixed mix of requests (single and batched decodes at
several context lengths, cold prefills, prefix-hit continuations) through the real engine
with the default model, times every ``step()`` and fits, by non-negative least squares on
the second of two passes (the first pays JIT compilation):

* the step model: ``step = overhead + overhead_row * rows + overhead_ctx * live context
  tokens + sum of its calls' prices`` (the calls grouped and padded as the runner does,
  ``tokencake.buckets``). Each shape is timed twice on dummy pages, with one-token contexts
  and with its page bucket's full span; a call is priced between the two by its longest
  row's context (``bench.presets.price_calls``), since the chunked attention's work follows it.
  Gathering live pages is the ``overhead_ctx`` term;
* a linear model ``a + b * decode_rows + c * prefill_tokens + d * decode_context +
  e * prefill x ctx``, whose prefill terms give the policies' recompute-cost estimate.

It also times a few host copies for the transfer bandwidth. Writes the preset JSON
(engine settings + coefficients + fit quality) that ``bench.presets.local`` reads.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.presets import (
    DEFAULT_LOCAL,
    LOCAL_PRESET_PATH,
    linear_features,
    load_local,
    make_real_engine,
    plan_spans,
    price_calls,
    shape_key,
)


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients clipped at zero (drop negatives, refit)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def _phases(rng: random.Random, vocab: int) -> list[list[tuple[list[int], int]]]:
    """Request batches run one after another: (prompt ids, max_tokens)."""

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    shared = toks(600)
    return [
        [(toks(200), 24)],
        [(toks(n), 24) for n in (100, 200, 300, 400)],
        [(toks(64), 16) for _ in range(8)],
        [(shared, 4)],
        [(shared + toks(64), 16), (shared + toks(128), 16)],  # prefix-hit continuations
        [(toks(1000), 12), (toks(700), 12)],
    ]


def run_pass(engine: Any, rng: random.Random) -> list[tuple[list[float], list, float]]:
    """Run every phase to completion; returns (features, chunk spans, step seconds) per
    executed step."""
    from tokencake.sampling_params import SamplingParams

    sched = engine.scheduler
    inner = sched.schedule
    box: dict[str, Any] = {}

    def schedule() -> Any:  # features before the step (it appends the sampled tokens)
        box["plan"] = plan = inner()
        box["features"] = linear_features(plan)
        box["spans"] = plan_spans(plan)
        return plan

    sched.schedule = schedule
    samples = []
    n = 0
    for phase in _phases(rng, engine.model_config.vocab_size):
        for prompt, mt in phase:
            engine.add_request(prompt, SamplingParams(max_tokens=mt, ignore_eos=True), f"c{n}")
            n += 1
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            plan = box.get("plan")
            if plan is not None and plan.chunks:
                samples.append((box["features"], box["spans"], dt))
    sched.schedule = inner
    return samples


def calibration_engine(eng_kw: dict[str, Any], model: Any = None) -> Any:
    """The engine the mix runs on: ``eng_kw``'s settings with a pool of at least 400 pages
    (the batches above must not preempt) and synchronous steps (each step's wall time must
    be its own plan's; with overlap it is the plan before's). ``model`` as for
    :func:`bench.presets.make_real_engine`."""
    kw = {**eng_kw, "num_pages": max(eng_kw["num_pages"], 400), "overlap": False}
    return make_real_engine("vllm", model, kw)


def scramble_pool(engine: Any, rng: random.Random) -> None:
    """Shuffle the idle engine's free list. A serving pool hands out pages in no particular
    order after a while (prefix caching, frees at random times); a fresh one hands them out
    in sequence, which gathers faster. A timed pass after this reads pages the way a busy
    engine does."""
    pool = engine.pool
    pool.evict_cached()
    held = pool.allocate(pool.num_free)
    rng.shuffle(held)
    pool.free(held)


def time_copies(engine: Any, n_blocks: int = 32, repeats: int = 3) -> float:
    """Bytes/s of device->host copies of ``n_blocks`` pages (the engine must be idle)."""
    if engine.transfer is None:
        return float(DEFAULT_LOCAL["bandwidth"])
    dev = tuple(range(1, n_blocks + 1))
    host = tuple(range(1, n_blocks + 1))
    rates = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        h = engine.transfer.issue("d2h", dev, host, f"cal{i}")
        engine.transfer.wait([h])
        if i:  # the first copy compiles
            rates.append(h.nbytes / (time.perf_counter() - t0))
    return float(np.median(rates))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(LOCAL_PRESET_PATH))
    ap.add_argument("--num-pages", type=int, default=None)
    args = ap.parse_args(argv)

    from tokencake.diagnostics import time_shapes

    cfg = load_local()
    eng_kw = dict(cfg["engine"])
    if args.num_pages:
        eng_kw["num_pages"] = args.num_pages
    engine = calibration_engine(eng_kw)
    mc = engine.model_config
    rng = random.Random(0)
    t0 = time.time()
    run_pass(engine, rng)  # compiles every bucket this mix reaches
    scramble_pool(engine, rng)
    samples = run_pass(engine, rng)
    x = np.array([f for f, _, _ in samples])
    y = np.array([t for _, _, t in samples])
    coef = nnls(x, y)  # the linear model: kept for the recompute-cost terms
    # The step model proper: every compiled call shape priced on its own, then the per-step
    # and per-row overhead fitted to what the real steps took beyond their calls.
    buckets = engine.runner.cfg.buckets
    # The engine's resolved bucketing goes into the preset: the simulator must group and pad
    # calls as this engine did, and the real-engine runs must build the same engine.
    eng_kw["bucket_pages"] = buckets.bucket_pages
    eng_kw["fused_steps"] = buckets.fused_steps
    shapes = [*buckets.shapes(), *buckets.fused_shapes()]
    shape_s = {shape_key(sh): t for sh, t in time_shapes(engine.runner, shapes).items()}
    shape_full_s = {
        shape_key(sh): t for sh, t in time_shapes(engine.runner, shapes, full_context=True).items()
    }
    calls = np.array([price_calls(buckets, shape_s, shape_full_s, sp) for _, sp, _ in samples])
    rows = np.array([[1.0, len(sp), sum(a + n for a, n in sp)] for _, sp, _ in samples])
    over = nnls(rows, y - calls)
    pred = calls + rows @ over
    rel = np.abs(pred - y) / y
    bw = time_copies(engine)
    kv = engine.runner.kv_spec
    out = {
        "engine": eng_kw,
        "bytes_per_token": int(kv.bytes_per_page // eng_kw["page_size"]),
        "bandwidth": bw,
        "step": {
            "a": float(coef[0]),
            "b": float(coef[1]),
            "c": float(coef[2]),
            "d": float(coef[3]),
            "e": float(coef[4]),
            "idle": 1e-3,
            "overhead": float(over[0]),
            "overhead_row": float(over[1]),
            "overhead_ctx": float(over[2]),
            "shape_s": shape_s,
            "shape_full_s": shape_full_s,
        },
        "vocab_size": mc.vocab_size,
        "calibration": {
            "model": engine.model_name,
            "samples": len(samples),
            "median_rel_error": float(np.median(rel)),
            "total_time_pred_vs_meas": float(pred.sum() / y.sum()),
            "linear_median_rel_error": float(np.median(np.abs(x @ coef - y) / y)),
            "decode_b1_step_s": float(
                np.median([t for f, _, t in samples if f[1] == 1 and not f[2]])
            )
            if any(f[1] == 1 and not f[2] for f, _, _ in samples)
            else None,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_s": time.time() - t0,
        },
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
