"""Pure-JAX paged attention: the oracle every kernel is tested against.

The batch is ragged: row ``s`` of ``q`` holds ``q_lens[s]`` valid query tokens (a prefill chunk,
or 1 for a decode step, or 0 for a padding row), and its context is ``kv_lens[s]`` tokens long,
*including* those query tokens, whose K/V have already been written into the pages. Query token
``i`` of row ``s`` sits at position ``kv_lens[s] - q_lens[s] + i`` and attends causally to
positions ``0 ..`` that position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """``pages[num_pages, page_size, H, D]`` x ``block_tables[S, P]`` -> ``[S, P*page_size, H, D]``."""
    s, p = block_tables.shape
    n, page, h, d = pages.shape
    # A row gather over flattened pages: XLA:CPU runs this ~4x faster than fancy indexing
    # on the 4-D array (one contiguous copy per page instead of a generic gather).
    rows = jnp.take(pages.reshape(n, page * h * d), block_tables.reshape(-1), axis=0)
    return rows.reshape(s, p * page, h, d)


def causal_mask(q_len_pad: int, k_len_pad: int, q_lens: jax.Array, kv_lens: jax.Array) -> jax.Array:
    """Boolean ``[S, Q, K]``: query ``i`` of row ``s`` may see key ``j``."""
    qi = jnp.arange(q_len_pad)[None, :, None]
    kj = jnp.arange(k_len_pad)[None, None, :]
    q_pos = (kv_lens - q_lens)[:, None, None] + qi
    valid_q = qi < q_lens[:, None, None]
    return valid_q & (kj <= q_pos) & (kj < kv_lens[:, None, None])


def reference_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Attention of ``q[S, Q, Hq, D]`` over one layer's pages ``[num_pages, page_size, Hkv, D]``.

    Returns ``[S, Q, Hq, D]``; rows and query slots past ``q_lens`` come back as zeros.
    Softmax runs in float32 whatever the input dtype.
    """
    s, qn, hq, d = q.shape
    hkv = k_pages.shape[2]
    group = hq // hkv
    k = gather_pages(k_pages, block_tables).astype(jnp.float32)  # [S, K, Hkv, D]
    v = gather_pages(v_pages, block_tables).astype(jnp.float32)
    kn = k.shape[1]
    # One batched matmul per (sequence, KV head) with the head group's queries stacked as rows:
    # [S, Hkv, G*Q, D] @ [S, Hkv, D, K]. XLA:CPU runs this 3x faster than the equivalent
    # 5-D einsum, which it lowers with extra transposes.
    qg = q.astype(jnp.float32).reshape(s, qn, hkv, group, d).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(s, hkv, group * qn, d)
    scores = jnp.matmul(qg, k.transpose(0, 2, 3, 1)) * scale  # [S, Hkv, G*Q, K]
    mask = causal_mask(qn, kn, q_lens, kv_lens)  # [S, Q, K]
    mask = jnp.broadcast_to(mask[:, None, None], (s, 1, group, qn, kn)).reshape(
        s, 1, group * qn, kn
    )
    scores = jnp.where(mask, scores, -jnp.inf)
    # Fully masked rows (padding) would give NaN; give them a finite all-zero output instead.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.matmul(probs, v.transpose(0, 2, 1, 3)) / jnp.where(denom == 0.0, 1.0, denom)
    out = out.reshape(s, hkv, group, qn, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(s, qn, hq, d).astype(q.dtype)


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float) -> jax.Array:
    """Plain causal attention over contiguous ``[T, H, D]`` tensors (independent test oracle)."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    k = jnp.repeat(k, group, axis=1)
    v = jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    mask = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(mask[None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("hqk,khd->qhd", probs, v.astype(jnp.float32)).astype(q.dtype)
