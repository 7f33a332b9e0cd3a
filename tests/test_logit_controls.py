"""Penalties, logit bias and min_p: the jitted transform against an independent numpy
reference, the runner's row filling end to end, and SamplingParams validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokencake.diagnostics import prompt_logits
from tokencake.models.logits_adjust import LogitsAdjust, adjust_logits, mask_words
from tokencake.row_controls import MAX_LOGIT_BIAS, RowControls, TokenCounts
from tokencake.sampler import _min_p_filtered
from tokencake.sampling_params import SamplingParams

V = 100


def ref_adjust(logits, bias, prompt, output, presence, frequency, repetition, allowed):
    """Numpy reference, written from the OpenAI / Hugging Face formulas, one row at a time."""
    out = logits.astype(np.float64).copy()
    for t, b in bias.items():
        out[t] += b
    seen = set(prompt) | set(output)
    for t in seen:
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        c = output.count(t)
        out[t] -= frequency * c + presence * 1.0
    if allowed is not None:
        out[[t for t in range(len(out)) if t not in allowed]] = -np.inf
    return out


def neutral(rows: int, capacity: int) -> LogitsAdjust:
    return LogitsAdjust(
        np.full((rows, mask_words(V)), -1, np.int32),
        np.zeros((rows, MAX_LOGIT_BIAS), np.int32),
        np.zeros((rows, MAX_LOGIT_BIAS), np.float32),
        np.full((rows, capacity), V, np.int32),
        np.zeros((rows, capacity), np.float32),
        np.zeros((rows,), np.float32),
        np.zeros((rows,), np.float32),
        np.ones((rows,), np.float32),
    )


class _FixedMask:
    """A grammar stand-in that allows a fixed token set (tests the packing and unpacking)."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def fill_mask(self, words: np.ndarray) -> None:
        words[:] = 0
        for t in self.allowed:
            words[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def accept(self, token: int) -> None:
        pass


@pytest.mark.parametrize("seed", range(6))
def test_adjust_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    rows, cap = 5, 40
    logits = rng.normal(0, 3, (rows, V)).astype(np.float32)
    adj = neutral(rows, cap)
    expected = []
    for r in range(rows):
        kind = (seed + r) % 4  # mix plain rows with adjusted ones in one batch
        if kind == 0:
            expected.append(logits[r].astype(np.float64))
            continue
        prompt = rng.integers(0, V, 12).tolist()
        output = rng.integers(0, V, 15).tolist()
        bias = {int(t): float(rng.uniform(-100, 100)) for t in rng.integers(0, V, 4)}
        pres, freq = float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))
        rep = float(rng.uniform(0.5, 2.0))
        allowed = set(rng.integers(0, V, 30).tolist()) | {31, 63, 99} if kind == 3 else None
        c = RowControls(
            prompt=prompt, capacity=cap, presence=pres, frequency=freq, repetition=rep,
            logit_bias=sorted(bias.items()),
            grammar=_FixedMask(allowed) if allowed is not None else None,
        )  # fmt: skip
        for t in output:
            c.accept(t)
        c.fill(r, adj)
        expected.append(ref_adjust(logits[r], bias, prompt, output, pres, freq, rep, allowed))
    got = np.asarray(jax.jit(adjust_logits)(jnp.asarray(logits), adj))
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-4)


def test_neutral_rows_are_untouched_bit_for_bit():
    logits = np.random.default_rng(0).normal(0, 5, (3, V)).astype(np.float32)
    got = np.asarray(jax.jit(adjust_logits)(jnp.asarray(logits), neutral(3, 16)))
    assert np.array_equal(got, logits)


def test_min_p_matches_reference():
    rng = np.random.default_rng(1)
    scaled = rng.normal(0, 2, (4, V)).astype(np.float32)
    min_p = np.array([0.0, 0.05, 0.3, 1.0], np.float32)
    got = np.asarray(_min_p_filtered(jnp.asarray(scaled), jnp.asarray(min_p)))
    for r in range(4):
        p = np.exp(scaled[r] - scaled[r].max())
        p /= p.sum()
        keep = p >= min_p[r] * p.max() * (1 - 1e-6)
        assert np.array_equal(np.isfinite(got[r]), keep)
        assert np.array_equal(got[r][keep], scaled[r][keep])


def test_token_counts_track_distinct_tokens():
    tc = TokenCounts([5, 5, 7], capacity=8)
    for t in (7, 9, 9, 9):
        tc.add_output(t)
    got = dict(zip(tc.ids[: len(tc)].tolist(), tc.counts[: len(tc)].tolist(), strict=True))
    assert got == {5: 0.0, 7: 1.0, 9: 3.0}


def test_runner_row_matches_reference(make_engine):
    """End to end through the runner: a greedy prefill row with penalties and bias picks the
    argmax of the numpy-adjusted logits of the same prompt; logprobs stay the raw model's."""
    from tokencake.runner import RowRequest

    engine = make_engine()
    runner = engine.runner
    rng = np.random.default_rng(3)
    prompt = rng.integers(8, 256, 20).tolist()
    blocks = engine.pool.allocate(2)
    raw = prompt_logits(runner, prompt, blocks)[-1]
    prompt_part, output_part = prompt[:8], prompt[8:]  # pretend the tail was generated
    top = int(np.argmax(raw))
    bias = {top: -30.0, int(np.argsort(raw)[-5]): 2.5}
    c = RowControls(
        prompt=prompt_part, capacity=runner.penalty_capacity, presence=0.7, frequency=1.9,
        repetition=1.6, logit_bias=sorted(bias.items()),
    )  # fmt: skip
    for t in output_part:
        c.accept(t)
    ref = ref_adjust(raw, bias, prompt_part, output_part, 0.7, 1.9, 1.6, None)
    row = RowRequest("r", prompt, 0, blocks, 0.0, 0, 1.0, 0, 0, controls=c)
    plain = RowRequest("p", prompt, 0, blocks, 0.0, 0, 1.0, 0, 0)
    out = runner.execute([row, plain])
    engine.pool.free(blocks)
    assert out["r"].token == int(np.argmax(ref)) != top
    assert out["p"].token == top
    lse = np.log(np.exp(raw - raw.max()).sum()) + raw.max()
    assert out["r"].logprob == pytest.approx(raw[out["r"].token] - lse, abs=1e-3)


def test_engine_logit_bias_forces_and_bans_tokens(make_engine):
    engine = make_engine()
    forced = engine.add_request("abc", SamplingParams(max_tokens=6, logit_bias={"65": 100}))
    plain = engine.add_request("abc", SamplingParams(max_tokens=6))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs[forced].token_ids == [65] * 6
    banned = outs[plain].token_ids[0]
    rid = engine.add_request("abc", SamplingParams(max_tokens=6, logit_bias={banned: -100}))
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert banned not in outs[rid].token_ids


def test_engine_repetition_penalty_changes_repeats(make_engine):
    """Greedy on random weights loops; a strong frequency penalty breaks the loop."""
    engine = make_engine()
    a = engine.add_request("hello", SamplingParams(max_tokens=30))
    b = engine.add_request("hello", SamplingParams(max_tokens=30, frequency_penalty=2.0))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})

    def max_repeat(ids):
        return max(ids.count(t) for t in set(ids))

    assert max_repeat(outs[b].token_ids) <= max_repeat(outs[a].token_ids)
    assert outs[b].token_ids != outs[a].token_ids


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {"5": 101}}, "logit_bias[5]"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys"),
        ({"logit_bias": {i: 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "at most 300"),
        ({"n": 0}, "n must be"),
        ({"structured": {"type": "json_object"}}, "structured must be"),
    ],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_logit_bias_outside_vocab_is_refused(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="logit_bias token id 100000"):
        engine.add_request("x", SamplingParams(logit_bias={100000: 1.0}))
    assert not engine.has_unfinished_requests()
