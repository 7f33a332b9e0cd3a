"""Engine behaviour on the tiny random model: batching, prefix caching, preemption and chunking
never change greedy outputs; bad input is refused cleanly; nothing compiles after warm-up."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.helpers.compiles import recorded_compiles
from tokencake.llm import LLM
from tokencake.sampling_params import SamplingParams

PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "a",
    "multi-agent applications alternate llm calls and tool calls " * 3,
    "hello world, hello world, hello world!",
    "short",
    "0123456789" * 9,
]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def run_solo(engine, prompts, params=GREEDY):
    llm = LLM.from_engine(engine)
    return [llm.generate([p], params)[0].token_ids for p in prompts]


def run_batch(engine, prompts, params=GREEDY):
    return [o.token_ids for o in LLM.from_engine(engine).generate(prompts, params)]


@pytest.fixture
def solo_reference(make_engine):
    return run_solo(make_engine(enable_prefix_cache=False), PROMPTS)


def test_outputs_vary(solo_reference):
    # Guard against a vacuous model: different prompts must give different continuations.
    assert len({tuple(t) for t in solo_reference}) >= 4


def test_batched_equals_solo(make_engine, solo_reference):
    assert run_batch(make_engine(), PROMPTS) == solo_reference


def test_prefix_cache_hits_do_not_change_outputs(make_engine, solo_reference):
    engine = make_engine()
    first = run_batch(engine, PROMPTS)
    second = run_batch(engine, PROMPTS)
    assert first == solo_reference and second == solo_reference
    assert engine.pool.hits > 0
    shared = [PROMPTS[2] + " extra tail", PROMPTS[2] + " another tail"]
    ref = run_solo(make_engine(enable_prefix_cache=False), shared)
    assert run_batch(engine, shared) == ref


def test_preemption_under_pressure_matches_ample_pool(make_engine, solo_reference):
    engine = make_engine(num_pages=14, max_num_seqs=6)  # 13 usable blocks for 6 sequences
    assert run_batch(engine, PROMPTS) == solo_reference


def test_decode_growth_preempts_and_outputs_match(make_engine):
    """vLLM-style admission takes a request only when its current sequence fits, so preemption
    comes from decode growth: four short prompts admitted into 7 blocks grow to ~17 blocks."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[4]]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ref = run_solo(make_engine(enable_prefix_cache=False), prompts, params)
    engine = make_engine(num_pages=8, max_num_seqs=4)
    assert run_batch(engine, prompts, params) == ref
    assert engine.scheduler.num_preemptions > 0


def test_chunked_prefill_matches(make_engine, solo_reference):
    engine = make_engine(max_num_batched_tokens=32, max_prefill_chunk=32)
    assert run_batch(engine, PROMPTS) == solo_reference


def test_poisoned_free_pages_do_not_leak(make_engine, solo_reference):
    engine = make_engine(enable_prefix_cache=False)
    k, v = engine.runner.k, engine.runner.v
    engine.runner.k = jax.numpy.full_like(k, jax.numpy.nan)
    engine.runner.v = jax.numpy.full_like(v, 1e30)
    assert run_batch(engine, PROMPTS) == solo_reference


def test_seeded_sampling_is_batch_independent(make_engine):
    params = SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True
    )
    engine = make_engine()
    solo = run_solo(engine, PROMPTS[:3], params)
    batch = run_batch(engine, PROMPTS[:3], params)
    assert solo == batch
    other = run_batch(
        engine, PROMPTS[:1], SamplingParams(max_tokens=16, temperature=0.9, seed=8, ignore_eos=True)
    )
    greedy = run_batch(engine, PROMPTS[:1], GREEDY)
    assert other[0] != greedy[0][:16] or solo[0] != other[0]


def test_top_k_one_is_greedy(make_engine, solo_reference):
    params = SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert run_batch(make_engine(), PROMPTS, params) == solo_reference


def test_stop_strings_and_max_tokens(make_engine):
    engine = make_engine()
    full = LLM.from_engine(engine).generate(PROMPTS[0], GREEDY)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    text = full.text
    stop = text[5:8]
    assert stop and stop in text
    out = LLM.from_engine(engine).generate(
        PROMPTS[0], SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]


def test_eos_stops(make_engine, tiny_model):
    engine = make_engine()
    full = LLM.from_engine(engine).generate(PROMPTS[2], GREEDY)[0].token_ids
    eos_tok = full[3]
    out = LLM.from_engine(engine).generate(
        PROMPTS[2], SamplingParams(max_tokens=24, stop_token_ids=[eos_tok])
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == full[: full.index(eos_tok) + 1]


def test_logprobs_match_distribution(make_engine):
    engine = make_engine()
    out = LLM.from_engine(engine).generate(
        PROMPTS[0], SamplingParams(max_tokens=4, logprobs=5, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == 4
    for lp in out.logprobs:
        assert len(lp.top) == 5
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
        assert np.isclose(lp.top[0][1], lp.logprob, atol=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:], strict=False))
        assert lp.logprob <= 0


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", SamplingParams(), "empty"),
        ([1, 2, 999], SamplingParams(), "vocabulary"),
        ("x" * 300, SamplingParams(max_tokens=8), "context limit"),
        ("ok", SamplingParams(max_tokens=255), "context limit"),
        (12, SamplingParams(), "prompt must be"),
    ],
)
def test_bad_input_is_refused_and_engine_keeps_serving(make_engine, prompt, params, message):
    engine = make_engine()
    with pytest.raises((ValueError, TypeError), match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished_requests()
    assert run_batch(engine, PROMPTS[:2]) == run_solo(engine, PROMPTS[:2])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(logprobs=99),
        dict(stop=[""]),
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_abort_frees_blocks(make_engine):
    engine = make_engine(enable_prefix_cache=False)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()
    engine.step()
    assert engine.pool.num_used > 0
    for rid in ids:
        assert engine.abort_request(rid)
    assert not engine.abort_request("nope")
    assert engine.pool.num_used == 0 and not engine.has_unfinished_requests()


def test_no_compilation_after_warmup(make_engine):
    engine = make_engine(warmup=True)
    with recorded_compiles() as compiles:
        plain = run_batch(engine, PROMPTS)
        run_batch(
            engine,
            [p * 2 for p in PROMPTS[:2]],
            SamplingParams(max_tokens=40, temperature=0.7, top_p=0.8, seed=1),
        )
        # Constrained, penalized, biased, min_p and plain rows mixed in one batch.
        from tokencake.structured import JsonObject, JsonSchema

        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        mixed = [
            SamplingParams(max_tokens=30, structured=JsonSchema(schema)),
            SamplingParams(max_tokens=30, temperature=1.0, seed=3, structured=JsonObject()),
            SamplingParams(max_tokens=30, presence_penalty=1.0, repetition_penalty=1.2),
            SamplingParams(max_tokens=30, logit_bias={70: 5.0}, temperature=0.9, min_p=0.1),
            GREEDY,
        ]
        sync = LLM.from_engine(engine).generate(PROMPTS[: len(mixed)], mixed)
        # Overlap scheduling (tests/test_overlap.py) feeds tokens between steps on the
        # device and must not compile anything either; constrained rows fall back to sync.
        engine.set_overlap(True)
        assert run_batch(engine, PROMPTS) == plain
        over = LLM.from_engine(engine).generate(PROMPTS[: len(mixed)], mixed)
        assert [o.token_ids for o in over] == [o.token_ids for o in sync]
        assert engine.overlap.overlapped_steps > 0
    assert compiles == [], f"compiled after warm-up: {compiles}"
    assert engine.runner.strict


def test_page_bucket_ladder_does_not_change_outputs(make_engine, solo_reference):
    # With the chunked attention (the CPU default) every call is padded to the largest page
    # bucket; the ladder pads the same rows to narrower tables. Padding must be invisible.
    ladder = make_engine(bucket_pages=True)
    assert ladder.runner.cfg.buckets.page_buckets == (8, 16)
    assert make_engine().runner.cfg.buckets.page_buckets == (16,)
    assert run_batch(ladder, PROMPTS) == solo_reference


def test_page_buckets_follow_the_attention_backend():
    from tokencake.runner_config import RunnerConfig

    def pages(**kw):
        return RunnerConfig(num_pages=4, **kw).buckets.page_buckets

    assert pages(attention_backend="chunked") == (128,)
    assert pages(attention_backend="reference") == (8, 32, 128)
    assert pages(attention_backend="chunked", bucket_pages=True) == (8, 32, 128)
    assert pages(attention_backend="reference", bucket_pages=False) == (128,)
    assert RunnerConfig(num_pages=4).resolved_bucket_pages("gpu") is True
    assert RunnerConfig(num_pages=4).resolved_bucket_pages("cpu") is False
