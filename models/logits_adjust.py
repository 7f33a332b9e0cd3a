"""Per-row logit adjustments inside the jitted step: grammar mask, logit bias, penalties.

Every array has a fixed shape per row bucket (penalty and bias lists are padded to a capacity
fixed by the runner's configuration), so a batch that mixes adjusted and plain rows runs the
executable compiled at warm-up. Each adjustment sits behind ``lax.cond`` on "does any row use
it", so a batch without them pays for three reductions over small arrays, not for ``[S, V]``
work. Neutral values: mask words all ones (-1), bias values 0, penalty ids ``V`` (dropped by
the scatter), presence/frequency 0, repetition 1.

Semantics follow vLLM (OpenAI's documented formulas): presence and frequency penalties count
the *generated* tokens, ``logit -= presence * (count > 0) + frequency * count``; the
repetition penalty (CTRL / Hugging Face) applies to every token of the prompt or the output,
dividing positive logits and multiplying negative ones.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASK_BITS = 32  # the token mask is packed into int32 words, bit ``v % 32`` of word ``v // 32``


class LogitsAdjust(NamedTuple):
    """Per-row adjustment inputs, padded to the batch's row bucket ``S``."""

    token_mask: jax.Array  # [S, ceil(V/32)] i32 bit-packed allowed tokens; -1 = all allowed
    bias_ids: jax.Array  # [S, B] i32 token ids of logit_bias entries (padding: any id, value 0)
    bias_values: jax.Array  # [S, B] f32 added to the logits
    penalty_ids: jax.Array  # [S, P] i32 distinct tokens of prompt+output (padding: V)
    penalty_counts: jax.Array  # [S, P] f32 occurrences of that token in the output
    presence: jax.Array  # [S] f32
    frequency: jax.Array  # [S] f32
    repetition: jax.Array  # [S] f32, 1 = off


def mask_words(vocab_size: int) -> int:
    """Number of int32 words of one row's packed token mask."""
    return -(-vocab_size // MASK_BITS)


def unpack_mask(words: jax.Array, vocab_size: int) -> jax.Array:
    """``[S, W]`` packed int32 words -> ``[S, vocab_size]`` bool (True = allowed)."""
    bits = jnp.arange(MASK_BITS, dtype=jnp.int32)
    allowed = (words[:, :, None] >> bits) & 1  # [S, W, 32]; arithmetic shift, bit 31 too
    return allowed.reshape(words.shape[0], -1)[:, :vocab_size].astype(bool)


def _apply_penalties(logits: jax.Array, adj: LogitsAdjust) -> jax.Array:
    s, v = logits.shape
    rows = jnp.arange(s)[:, None]
    counts = (
        jnp.zeros((s, v), jnp.float32)
        .at[rows, adj.penalty_ids]
        .add(adj.penalty_counts, mode="drop")
    )
    seen = jnp.zeros((s, v), bool).at[rows, adj.penalty_ids].set(True, mode="drop")
    rep = adj.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (
        logits
        - adj.frequency[:, None] * counts
        - adj.presence[:, None] * (counts > 0).astype(jnp.float32)
    )


def adjust_logits(logits: jax.Array, adj: LogitsAdjust) -> jax.Array:
    """Apply logit bias, then penalties, then the grammar mask (disallowed -> -inf)."""
    s = logits.shape[0]
    rows = jnp.arange(s)[:, None]
    logits = jax.lax.cond(
        jnp.any(adj.bias_values != 0),
        lambda x: x.at[rows, adj.bias_ids].add(adj.bias_values, mode="drop"),
        lambda x: x,
        logits,
    )
    penalized = (adj.presence != 0) | (adj.frequency != 0) | (adj.repetition != 1)
    logits = jax.lax.cond(
        jnp.any(penalized), lambda x: _apply_penalties(x, adj), lambda x: x, logits
    )
    return jax.lax.cond(
        jnp.any(adj.token_mask != -1),
        lambda x: jnp.where(unpack_mask(adj.token_mask, x.shape[1]), x, -jnp.inf),
        lambda x: x,
        logits,
    )
