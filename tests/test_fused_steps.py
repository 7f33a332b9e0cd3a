"""Fused steps (``EngineConfig.fused_steps``, issue 17 item 2): a step's prefill chunk and its
decode rows run as one device call. The calls are planned in ``tokencake/buckets.py`` (so the
simulator prices what the runner runs), greedy outputs equal the unfused engine's token for token
with requests arriving while others decode (so prefill and decode share steps), with overlap
scheduling too, and nothing compiles after warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.compiles import recorded_compiles
from tests.test_engine import PROMPTS
from tokencake.buckets import StepBuckets
from tokencake.config import EngineConfig
from tokencake.runner_config import RunnerConfig
from tokencake.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def test_calls_fuse_one_prefill_chunk_with_the_decode_rows():
    b = StepBuckets(16, 512, 16, 128, 2, fused_steps=True)
    rows = [(40, 1), (0, 70), (100, 1), (7, 1)]  # three decode rows and one prefill chunk
    (call,) = b.calls(rows)
    assert call.fused
    assert call.groups == ((True, [1], (1, 128, 8)), (False, [0, 2, 3], (4, 1, 8)))
    assert call.shape in b.fused_shapes()
    assert b.call_shapes(rows) == [((1, 128, 8), (4, 1, 8))]
    # Each group keeps its own pages bucket: a long decode context does not widen the chunk's.
    assert b.call_shapes([(0, 20), (300, 1)]) == [((1, 32, 8), (1, 1, 32))]
    # Two prefill chunks in one group are outside the family: two calls, as unfused.
    two = [(0, 20), (0, 30), (50, 1)]
    assert b.call_shapes(two) == [(2, 32, 8), (1, 1, 8)]
    assert b.call_shapes([(0, 100), (0, 1)]) == [((1, 128, 8), (1, 1, 8))]
    # By default every chunk length is fused; past a given fused_max_tokens a chunk runs alone.
    long = StepBuckets(16, 512, 16, 512, 2, fused_steps=True)
    assert long.call_shapes([(0, 300), (0, 1)]) == [((1, 512, 32), (1, 1, 8))]
    capped = StepBuckets(16, 512, 16, 512, 2, fused_steps=True, fused_max_tokens=128)
    assert capped.call_shapes([(0, 300), (0, 1)]) == [(1, 512, 32), (1, 1, 8)]
    assert capped.call_shapes([(0, 100), (0, 1)]) == [((1, 128, 8), (1, 1, 8))]
    # Only prefill, or only decode: nothing to fuse.
    assert b.call_shapes([(0, 20)]) == [(1, 32, 8)]
    assert b.call_shapes([(5, 1), (9, 1)]) == [(2, 1, 8)]
    # Off: the unfused calls, and no fused shape compiled.
    off = StepBuckets(16, 512, 16, 128, 2)
    assert off.call_shapes(rows) == [(1, 128, 8), (4, 1, 8)] and off.fused_shapes() == []


def test_fused_family_is_bounded():
    """One prefill chunk of any token bucket x a decode group on the x4 row ladder: 96
    programs with the page-bucket ladder, 12 with one page bucket (the CPU default)."""
    for bucket_pages, count in ((True, 96), (False, 12)):
        b = StepBuckets(16, 2048, 32, 512, 4, fused_steps=True, bucket_pages=bucket_pages)
        prefill_one = [s for s in b.shapes() if s[0] == 1 and s[1] > 1]
        decode = len(b.fused_decode_row_buckets) * len(b.page_buckets)
        assert len(b.fused_shapes()) == len(prefill_one) * decode == count
        assert all(pf in b.shapes() and dc[1] == 1 for pf, dc in b.fused_shapes())


def staggered(engine, params=GREEDY, prompts=PROMPTS) -> dict[str, tuple[int, ...]]:
    """``prompts`` added two at a time, every third step, so new prompts prefill while the
    earlier ones decode; returns each request's tokens."""
    pending = list(enumerate(prompts))
    done: dict[str, tuple[int, ...]] = {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:
            for i, p in pending[:2]:
                engine.add_request(p, params, request_id=f"r{i}")
            pending = pending[2:]
        for out in engine.step():
            if out.finished:
                assert out.error is None
                done[out.request_id] = tuple(out.token_ids)
        steps += 1
        assert steps < 400
    return done


def both_ways(engine, params=GREEDY, prompts=PROMPTS) -> tuple[dict, dict]:
    """:func:`staggered` with fusion off, then on, on one engine built with ``fused_steps``
    (``ModelRunner.set_fused_steps``: the same weights and executables)."""
    engine.runner.set_fused_steps(False)
    plain = staggered(engine, params, prompts)
    assert engine.runner.fused_counts["fused"] == 0
    engine.runner.set_fused_steps(True)
    return plain, staggered(engine, params, prompts)


def test_fused_matches_unfused_greedy(make_engine):
    engine = make_engine(fused_steps=True, enable_prefix_cache=False)
    plain, fused = both_ways(engine)
    assert fused == plain and len(plain) == len(PROMPTS)
    assert engine.runner.fused_counts["fused"] > 0  # prefill and decode shared calls
    # Overlap scheduling feeds pending tokens across a fused call's groups too.
    engine.set_overlap(True)
    assert staggered(engine) == plain
    assert engine.overlap.overlapped_steps > 0


def test_long_chunks_fuse_and_match_unfused(make_engine):
    # Chunks past 128 tokens join the decode rows' call too (fused_max_tokens defaults to
    # every prefill token bucket); the long prompts arrive while earlier ones decode.
    long_prompts = [p * 2 for p in PROMPTS]
    engine = make_engine(fused_steps=True, enable_prefix_cache=False, max_model_len=512,
                         max_num_batched_tokens=256, max_prefill_chunk=256,
                         max_prefill_seqs=1)  # fmt: skip
    plain, fused = both_ways(engine, prompts=long_prompts)
    assert fused == plain
    fused_chunks = [sh[0][1] for sh in engine.runner._compiled if not isinstance(sh[0], int)]
    assert max(fused_chunks) == 256  # a chunk of the 256-token bucket ran fused


def test_fused_with_preemption_and_prefix_hits(make_engine):
    # A small pool: decode growth preempts and recomputes; the second run hits the prefix
    # cache the first one filled.
    engine = make_engine(num_pages=20, max_num_seqs=6, fused_steps=True)
    plain, fused = both_ways(engine)
    assert fused == plain
    assert engine.scheduler.num_preemptions > 0 and engine.pool.hits > 0
    assert engine.runner.fused_counts["fused"] > 0


def test_no_compilation_after_warmup_fused(make_engine):
    # Four rows and a 128-token context (one pages bucket): 11 plain and fused shapes to warm
    # up instead of 40, where this was the slowest test of the suite; both prefill buckets
    # stay, and the staggered prompts (those that fit) still queue, prefill and fuse.
    engine = make_engine(warmup=True, fused_steps=True, max_num_seqs=4, max_model_len=128)
    b = engine.runner.cfg.buckets
    assert len(engine.runner._compiled) == len(b.shapes()) + len(b.fused_shapes())
    assert len(b.fused_shapes()) > 1 and len({s[1] for s in b.shapes()}) > 2
    fits = [p for p in PROMPTS if len(p) + 12 <= 128]
    with recorded_compiles() as compiles:
        staggered(engine, prompts=fits)
        sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=5, presence_penalty=0.5)
        staggered(engine, sampled, prompts=fits)
    assert compiles == [], f"compiled after warm-up: {compiles}"
    assert engine.runner.fused_counts["fused"] > 0


def test_fused_sampling_matches_unfused(make_engine):
    # Seeded sampling and logit controls: a row's draw depends on its seed and output count,
    # not on which call (or row of it) it ran in.
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=11, frequency_penalty=0.3)
    plain, fused = both_ways(make_engine(fused_steps=True, enable_prefix_cache=False), params)
    assert fused == plain


def test_set_fused_steps_needs_the_family_compiled(make_engine):
    with pytest.raises(ValueError, match="needs a runner built with fused_steps=True"):
        make_engine(fused_steps=False).runner.set_fused_steps(True)


def test_fused_steps_refused_with_several_devices():
    with pytest.raises(ValueError, match="fused_steps is not supported with tensor_parallel"):
        EngineConfig(fused_steps=True, distributed=True)
    with pytest.raises(ValueError, match="fused_steps is not supported with tensor_parallel"):
        EngineConfig(fused_steps=True, tensor_parallel_size=2)


def test_fused_forward_equals_separate_calls(tiny_model):
    """The model alone: one fused forward over two groups gives each group's hidden states and
    KV writes of two separate forwards (f32; the dense parts see the same tokens)."""
    from tokencake.models.attention.backend import get_backend
    from tokencake.models.llama import Batch, DecoderLM

    cfg, params, _ = tiny_model
    model = DecoderLM(cfg, params, "float32", "scan")
    rng = np.random.default_rng(0)
    shape = (cfg.num_layers, 12, 16, cfg.num_kv_heads, cfg.head_dim)
    k0 = rng.standard_normal(shape).astype(np.float32)
    v0 = rng.standard_normal(shape).astype(np.float32)
    i32 = np.int32
    # Prefill: one row, 20 tokens from position 5 into pages 1-2; decode: two rows at
    # positions 30 and 9 (pages 3-4 and 5).
    pf = Batch(
        rng.integers(1, cfg.vocab_size, (1, 32)).astype(i32),
        np.arange(5, 37, dtype=i32)[None],
        np.array([20], i32), np.array([25], i32), np.array([[1, 2, 0, 0]], i32),
    )  # fmt: skip
    dc = Batch(
        rng.integers(1, cfg.vocab_size, (2, 1)).astype(i32),
        np.array([[30], [9]], i32), np.array([1, 1], i32), np.array([31, 10], i32),
        np.array([[3, 4], [5, 0]], i32),
    )  # fmt: skip
    attn = get_backend("reference").layer_fn()
    (hp, hd), kf, vf = model((pf, dc), k0, v0, attn)
    hp1, k1, v1 = model(pf, k0, v0, attn)
    hd1, k2, v2 = model(dc, k1, v1, attn)
    np.testing.assert_allclose(np.asarray(hp)[0, :20], np.asarray(hp1)[0, :20], atol=2e-5)
    np.testing.assert_allclose(np.asarray(hd), np.asarray(hd1), atol=2e-5)
    live = [1, 2, 3, 4, 5]  # the dummy page 0 takes padding writes in any order
    np.testing.assert_allclose(np.asarray(kf)[:, live], np.asarray(k2)[:, live], atol=2e-5)
    np.testing.assert_allclose(np.asarray(vf)[:, live], np.asarray(v2)[:, live], atol=2e-5)


def test_cli_flag_sets_fused_steps():
    from tokencake.cli import build_parser, engine_config_from_args

    def parsed(*flags: str):
        return engine_config_from_args(build_parser().parse_args(["serve", *flags])).fused_steps

    assert parsed("--fused-steps") is True
    assert parsed("--no-fused-steps") is False
    assert parsed() is None  # the platform's default (RunnerConfig.resolved_fused_steps)


def test_fused_steps_are_on_by_default_on_one_cpu_device_only():
    assert RunnerConfig(num_pages=4).resolved_fused_steps("cpu") is True
    assert RunnerConfig(num_pages=4).resolved_fused_steps("gpu") is False
    assert RunnerConfig(num_pages=4, tensor_parallel_size=2).resolved_fused_steps("cpu") is False
    assert RunnerConfig(num_pages=4, fused_steps=False).resolved_fused_steps("cpu") is False
    assert RunnerConfig(num_pages=4, fused_steps=True).resolved_fused_steps("gpu") is True
    # several devices: the default resolves to off instead of being refused
    assert EngineConfig(tensor_parallel_size=2).fused_steps is False
    assert EngineConfig(distributed=True).fused_steps is False
