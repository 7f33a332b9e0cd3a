"""Paged attention for XLA:CPU whose cost follows the longest row's context, not the page bucket.

The reference gathers every page of the padded block table (``P`` pages per row, the compiled
bucket) and attends over all of them: a B=32 decode step with contexts of 130-260 tokens pads to
a 32-page (512-token) bucket and gathers, transposes and multiplies twice the keys it needs, per
layer. This backend walks the block table in chunks of keys (``DECODE_CHUNK_TOKENS`` for
decode rows, ``CHUNK_TOKENS`` for prefill chunks) with an online
(flash-style) softmax inside a ``fori_loop`` whose trip count is ``ceil(max(kv_lens) / chunk)``,
a traced value: the program stays one per bucket while the work stops at the longest live row.
Each chunk's gathered keys and values (a few hundred KiB at B=32) stay in cache between the
gather and the two matmuls, where the reference streams the whole padded gather through memory.

Row results do not depend on the other rows of the batch: a chunk wholly past a row's context
leaves that row's running max, sum and output bit-for-bit unchanged (its probabilities are exact
zeros and its correction factor is exactly one), so batching, padding rows and bucket choice do
not change a row's numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keys per loop iteration. Small enough that a chunk's gathered K and V stay in cache between
# the gather and the matmuls; large enough that the loop overhead stays small against a prefill
# chunk's matmuls. bench/bench_attention.py (32/64/128/256, default model heads, two runs):
# decode steps were fastest at 32 (B=32, 128-256 tokens: 3.8 vs 5.5 ms at 64), 512-token
# prefill chunks at 64 (1.5k context: 29.8 vs 36.8 ms at 32).
DECODE_CHUNK_TOKENS = 32
CHUNK_TOKENS = 64


def gather_chunk(pages: jax.Array, tables: jax.Array, layer: jax.Array | int | None) -> jax.Array:
    """``tables[S, C]`` of one layer's ``pages[N, page, H, D]`` (``layer`` None), or of layer
    ``layer`` of the whole cache ``[L, N, page, H, D]`` -> ``[S, C*page, H, D]``.

    Block ids come from the engine's pool (padding entries are the dummy page 0), so the gather
    promises in-bounds indices: XLA then emits a plain row copy, ~2x faster on CPU than
    ``jnp.take``'s default out-of-bounds fill.
    """
    page, h, d = pages.shape[-3:]
    s, c = tables.shape
    ids = tables.reshape(s * c, 1)
    lead = pages.shape[:-3]  # (N,) or (L, N)
    if layer is not None:
        ids = jnp.concatenate([jnp.full_like(ids, layer), ids], axis=1)
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(1,),
        collapsed_slice_dims=tuple(range(len(lead))),
        start_index_map=tuple(range(len(lead))),
    )
    rows = jax.lax.gather(
        pages.reshape(*lead, page * h * d),
        ids,
        dims,
        slice_sizes=(*(1 for _ in lead), page * h * d),
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return rows.reshape(s, c * page, h, d)


def chunked_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    chunk_tokens: int | None = None,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """Same contract as :func:`reference_paged_attention` (``q[S, Q, Hq, D]`` -> ``[S, Q, Hq, D]``,
    zeros past ``q_lens``), computed chunk by chunk up to the longest row's ``kv_len``.

    With ``layer`` given, ``k_pages``/``v_pages`` are the whole ``[L, N, page, Hkv, D]`` caches
    and the gathers read that layer's pages in place (the model's form). ``chunk_tokens``
    defaults to ``DECODE_CHUNK_TOKENS`` for single-token rows, ``CHUNK_TOKENS`` otherwise."""
    s, qn, hq, d = q.shape
    page, hkv = k_pages.shape[-3], k_pages.shape[-2]
    group = hq // hkv
    rows = group * qn
    if chunk_tokens is None:
        chunk_tokens = DECODE_CHUNK_TOKENS if qn == 1 else CHUNK_TOKENS
    per_chunk = max(1, chunk_tokens // page)
    width = block_tables.shape[1]
    if width % per_chunk:
        # Pad with the dummy page so every chunk is whole; its keys are masked by kv_lens.
        block_tables = jnp.pad(block_tables, ((0, 0), (0, per_chunk - width % per_chunk)))
    keys = per_chunk * page
    # [S, Hkv, G*Q, D] with the head group's queries stacked as rows, as the reference does.
    qg = (q.astype(jnp.float32) * scale).reshape(s, qn, hkv, group, d).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(s, hkv, rows, d)
    qi = jnp.arange(qn)
    q_pos = jnp.tile((kv_lens - q_lens)[:, None] + qi[None, :], (1, group))  # [S, G*Q]
    q_valid = jnp.tile(qi[None, :] < q_lens[:, None], (1, group))
    n_chunks = (jnp.max(kv_lens) + keys - 1) // keys

    def step(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        run_max, run_sum, acc = carry
        tables = jax.lax.dynamic_slice_in_dim(block_tables, i * per_chunk, per_chunk, axis=1)
        k = gather_chunk(k_pages, tables, layer).astype(jnp.float32)  # [S, keys, Hkv, D]
        v = gather_chunk(v_pages, tables, layer).astype(jnp.float32)
        scores = jnp.einsum("shrd,skhd->shrk", qg, k)  # [S, Hkv, G*Q, keys]
        k_pos = i * keys + jnp.arange(keys)
        visible = (
            q_valid[:, :, None]
            & (k_pos[None, None, :] <= q_pos[:, :, None])
            & (k_pos[None, None, :] < kv_lens[:, None, None])
        )  # [S, G*Q, keys]
        scores = jnp.where(visible[:, None], scores, -jnp.inf)
        new_max = jnp.maximum(run_max, jnp.max(scores, axis=-1))
        # A row that has seen no key yet keeps max -inf; shift by 0 so exp gives exact zeros.
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs = jnp.exp(scores - shift[..., None])
        correction = jnp.exp(run_max - shift)
        run_sum = run_sum * correction + jnp.sum(probs, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("shrk,skhd->shrd", probs, v)
        return new_max, run_sum, acc

    init = (
        jnp.full((s, hkv, rows), -jnp.inf, jnp.float32),
        jnp.zeros((s, hkv, rows), jnp.float32),
        jnp.zeros((s, hkv, rows, d), jnp.float32),
    )
    _, run_sum, acc = jax.lax.fori_loop(0, n_chunks, step, init)
    out = acc / jnp.where(run_sum == 0.0, 1.0, run_sum)[..., None]
    out = out.reshape(s, hkv, group, qn, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(s, qn, hq, d).astype(q.dtype)
