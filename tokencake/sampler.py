"""Sampling inside the jitted step: one token per row from its logits, with temperature,
top-k / top-p / min-p, seeded per-row keys, logit adjustments and the top-20 logprobs.
Only ``[S]`` ints (and the logprobs asked for) leave the device, not logits."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tokencake.models.logits_adjust import LogitsAdjust, adjust_logits

TOP_LOGPROBS = 20  # alternatives always computed; the engine keeps what a request asked for


class SamplingInputs(NamedTuple):
    """Per-row sampling controls, padded to the batch's row bucket."""

    temperature: jax.Array  # [S] f32, 0 = greedy
    top_k: jax.Array  # [S] i32, 0 = off
    top_p: jax.Array  # [S] f32, 1 = off
    seeds: jax.Array  # [S] i32
    counters: jax.Array  # [S] i32: tokens generated so far, folded into the key
    want_top: jax.Array  # [S] i32: 1 where the request asked for top logprobs
    min_p: jax.Array  # [S] f32, 0 = off: drop tokens below min_p * p(most likely token)


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [S] i32
    logprob: jax.Array  # [S] f32, log-probability of the chosen token
    top_ids: jax.Array  # [S, TOP_LOGPROBS] i32
    top_logprobs: jax.Array  # [S, TOP_LOGPROBS] f32


def _filtered_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask everything outside each row's top-k / nucleus (full sort; only runs when needed)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    k = jnp.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (rank < k) & (mass_before < top_p[:, None])
    keep_sorted = keep_sorted.at[:, 0].set(True)
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    return jnp.where(keep, logits, -jnp.inf)


def _min_p_filtered(scaled: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability
    (log space: ``logit < max_logit + log(min_p)``); ``min_p == 0`` keeps every token."""
    floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(scaled >= floor, scaled, -jnp.inf)


def sample(logits: jax.Array, inputs: SamplingInputs, adjust: LogitsAdjust) -> SampleOutput:
    """Sample one token per row of float32 ``logits[S, V]``.

    ``adjust`` (grammar mask, logit bias, penalties) changes what is sampled; the reported
    log-probabilities are of the model's raw distribution (vLLM's default ``raw_logprobs``).
    The expensive parts (random draws over the vocabulary, sorting for top-k/top-p, the top-20
    alternatives) sit behind ``lax.cond`` so an all-greedy batch without logprobs pays only for
    an argmax and a log-sum-exp: at B=32 the unconditional version cost more than the model.
    """
    raw = logits
    logits = adjust_logits(logits, adjust)
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    random_rows = inputs.temperature > 0

    def draw_all() -> jax.Array:
        needs_filter = jnp.any(random_rows & ((inputs.top_k > 0) | (inputs.top_p < 1.0)))
        filtered = jax.lax.cond(
            needs_filter,
            lambda: _filtered_logits(logits, inputs.top_k, inputs.top_p),
            lambda: logits,
        )
        temp = jnp.where(random_rows, inputs.temperature, 1.0)[:, None]
        scaled = filtered / temp
        scaled = jax.lax.cond(
            jnp.any(random_rows & (inputs.min_p > 0)),
            lambda x: _min_p_filtered(x, inputs.min_p),
            lambda x: x,
            scaled,
        )

        def draw(seed, counter, row):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), counter)
            return jax.random.categorical(key, row)

        sampled = jax.vmap(draw)(inputs.seeds, inputs.counters, scaled).astype(jnp.int32)
        return jnp.where(random_rows, sampled, greedy_tok)

    tokens = jax.lax.cond(jnp.any(random_rows), draw_all, lambda: greedy_tok)
    logits = raw
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    s = logits.shape[0]

    def top() -> tuple[jax.Array, jax.Array]:
        vals, ids = jax.lax.top_k(logits, TOP_LOGPROBS)
        return vals - lse[:, None], ids.astype(jnp.int32)

    def no_top() -> tuple[jax.Array, jax.Array]:
        return jnp.zeros((s, TOP_LOGPROBS), jnp.float32), jnp.zeros((s, TOP_LOGPROBS), jnp.int32)

    top_lp, top_ids = jax.lax.cond(jnp.any(inputs.want_top > 0), top, no_top)
    return SampleOutput(tokens, chosen, top_ids, top_lp)
