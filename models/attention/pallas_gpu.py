"""Ragged paged attention as a Pallas kernel for GPUs (Triton lowering), over the engine's layout.

One kernel serves the whole ragged batch: decode rows (``q_len == 1``), prefill-chunk rows (a
chunk attends to its cached prefix pages plus itself, causally) and padding rows (``q_len == 0``).
Semantics are exactly those of :func:`~tokencake.models.attention.reference.reference_paged_attention`.

KV layout (owned by ``memory/kv_cache.py``): one layer's ``k_pages``/``v_pages`` are
``[num_pages, page_size, Hkv, D]``. The kernel reads that layout in place (no per-call copy of the
cache): a ``BlockSpec`` squeezes the KV-head axis, so each program sees a strided
``[num_pages, page_size, D]`` view for its head and gathers whole pages through the block table.

Query layout inside the kernel: ``q[S, Q, Hq, D]`` is rearranged (a cheap copy, q is tiny next to
the cache) into ``[S, Hkv, Qp * Gp, D]``, where ``G = Hq // Hkv`` is padded to ``Gp`` (a power of
two) and ``Q`` to ``Qp``. Row ``r`` of a KV head's slab is query token ``r // Gp`` and query head
``r % Gp`` of that group, so all query heads sharing one KV head are processed together (GQA) and
every K/V page is loaded once per group instead of once per query head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tokencake.models.attention.backend import AttentionBackend

# --- Block sizes -------------------------------------------------------------------------------
# Query rows per program (query tokens x query heads of one KV group). 64 rows keep the score tile
# [rows, KV_BLOCK_TOKENS] and the accumulator [rows, D] in registers for D <= 128 with 4 warps.
MAX_BLOCK_ROWS = 64
# Triton's tl.dot needs every matmul dimension >= 16, so a program never has fewer rows than this.
MIN_BLOCK_ROWS = 16
# Key/value tokens per inner-loop step; PAGES_PER_BLOCK = KV_BLOCK_TOKENS // page_size pages are
# gathered per step (at least one page).
KV_BLOCK_TOKENS = 64
# Split-KV (flash-decoding): when the (row, head, query-block) grid is small -- e.g. a decode batch
# of 1 gives only Hkv programs -- each row's context is split across up to MAX_KV_SPLITS programs
# so that about TARGET_PROGRAMS programs keep the GPU's SMs busy (H100/H200 have 132 SMs).
TARGET_PROGRAMS = 256
MAX_KV_SPLITS = 16
NUM_WARPS = 4
NUM_STAGES = 2

# Finite "minus infinity": masked logits use it so that max/exp arithmetic never meets inf - inf.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)

# When None, make_backend() decides from the platform (interpret everywhere but on GPUs).
INTERPRET: bool | None = None


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_shapes(page_size: int, head_dim: int) -> None:
    """Raise ValueError when the Triton lowering cannot handle ``page_size``/``head_dim``.

    Triton tensors must have power-of-two sizes, and ``tl.dot`` needs the contracted ``head_dim``
    to be >= 16. The same limits are enforced in interpret mode so that CPU tests see what a GPU
    would refuse.
    """
    if not _is_pow2(page_size):
        raise ValueError(f"pallas-gpu attention needs a power-of-two page_size, got {page_size}")
    if not _is_pow2(head_dim) or head_dim < 16:
        raise ValueError(
            f"pallas-gpu attention needs a power-of-two head_dim >= 16, got {head_dim}"
        )


def _attention_kernel(
    # inputs
    q_lens_ref,  # [1]: this row's number of valid query tokens
    kv_lens_ref,  # [1]: this row's context length, query tokens included
    block_table_ref,  # [P_pad]: this row's page ids, padded with the dummy page 0
    q_ref,  # [rows, D]: query block (rows = block_q * Gp)
    k_ref,  # [num_pages, page_size, D]: every page, this program's KV head
    v_ref,  # [num_pages, page_size, D]
    # outputs: unnormalised partial results of this KV split (merged by the wrapper)
    o_ref,  # [rows, D] float32: sum_j p_j * v_j
    m_ref,  # [rows] float32: running max of the base-2 logits
    l_ref,  # [rows] float32: sum_j p_j
    *,
    block_q: int,
    group_pad: int,
    pages_per_block: int,
    num_splits: int,
    scale_log2: float,
):
    q_block = pl.program_id(2)
    split = pl.program_id(3)
    rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    q_len = q_lens_ref[0]
    kv_len = kv_lens_ref[0]

    # Query token index and absolute position of every row of the block.
    q_idx = q_block * block_q + lax.div(lax.iota(jnp.int32, rows), jnp.int32(group_pad))
    q_pos = kv_len - q_len + q_idx
    row_valid = q_idx < q_len

    # Causality bounds the keys this query block needs: up to its last valid query's position.
    # A block with no valid query (padding rows, or past q_len) does no work at all.
    q_first = q_block * block_q
    last_q = jnp.minimum(q_len, q_first + block_q)
    kv_hi = jnp.where(q_first < q_len, kv_len - q_len + last_q, 0)
    num_kv_blocks = pl.cdiv(kv_hi, block_k)
    # This split's share of those KV blocks (computed from the row's real length, so the work of a
    # short row is spread over the splits just as evenly as that of a long one).
    per_split = pl.cdiv(num_kv_blocks, num_splits)
    kv_block_lo = split * per_split
    kv_block_hi = jnp.minimum(kv_block_lo + per_split, num_kv_blocks)

    q = q_ref[...]

    def body(i, carry):
        o_prev, m_prev, l_prev = carry
        kv_block = kv_block_lo + i
        pages = block_table_ref[pl.ds(kv_block * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_k, head_dim)
        v = v_ref[pages].reshape(block_k, head_dim)
        k_pos = kv_block * block_k + lax.iota(jnp.int32, block_k)
        # Slots past kv_len (the tail of the last page, or the dummy page) may hold anything,
        # NaN included; 0 * NaN would leak through p @ v, so V is zeroed there, not just p.
        v = jnp.where((k_pos < kv_len)[:, None], v, jnp.zeros_like(v))
        # HIGHEST keeps float32 inputs out of TF32 on the Triton path (bf16 is unaffected).
        logits = (
            lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            )
            * scale_log2
        )
        mask = row_valid[:, None] & (k_pos[None, :] <= q_pos[:, None])
        logits = jnp.where(mask, logits, _MASK_VALUE)
        m_next = jnp.maximum(m_prev, logits.max(axis=-1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(logits - m_next[:, None]), 0.0)
        l_next = correction * l_prev + p.sum(axis=-1)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        return correction[:, None] * o_prev + pv, m_next, l_next

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), _MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    n_iter = jnp.maximum(kv_block_hi - kv_block_lo, 0)
    o, m, denom = lax.fori_loop(0, n_iter, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = denom


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def pallas_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Paged attention of ``q[S, Q, Hq, D]`` over ``[num_pages, page_size, Hkv, D]`` pages.

    Same contract as ``reference_paged_attention``: returns ``[S, Q, Hq, D]`` in ``q.dtype`` with
    zeros in query slots past ``q_lens``; softmax and accumulation run in float32.
    """
    s, qn, hq, d = q.shape
    num_pages, page_size, hkv, _ = k_pages.shape
    check_shapes(page_size, d)
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    group = hq // hkv
    group_pad = _next_pow2(group)
    pages_per_block = max(1, KV_BLOCK_TOKENS // page_size)
    block_k = pages_per_block * page_size
    if block_k < 16:  # only reachable with page_size < 16 and KV_BLOCK_TOKENS < 16
        raise ValueError(f"pallas-gpu attention needs >= 16 keys per block, got {block_k}")

    # Query block: as many tokens as fit MAX_BLOCK_ROWS, but no more than the batch's padded
    # query length (a pure-decode batch has Q == 1), and never under MIN_BLOCK_ROWS rows.
    block_q = min(max(1, MAX_BLOCK_ROWS // group_pad), _next_pow2(qn))
    block_q = max(block_q, MIN_BLOCK_ROWS // group_pad, 1)
    rows = block_q * group_pad
    num_q_blocks = pl.cdiv(qn, block_q)
    q_pad = num_q_blocks * block_q

    # The in-kernel page gather reads PAGES_PER_BLOCK table entries at a time; pad the table
    # with the dummy page so those reads stay in bounds (the keys they bring in are masked).
    p = block_tables.shape[1]
    p_pad = pl.cdiv(p, pages_per_block) * pages_per_block
    block_tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, p_pad - p)))
    q_lens = q_lens.astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)

    qg = q.astype(k_pages.dtype).reshape(s, qn, hkv, group, d)
    qg = jnp.pad(qg, ((0, 0), (0, q_pad - qn), (0, 0), (0, group_pad - group), (0, 0)))
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(s, hkv, q_pad * group_pad, d)

    num_programs = s * hkv * num_q_blocks
    num_splits = max(
        1, min(MAX_KV_SPLITS, p_pad // pages_per_block, TARGET_PROGRAMS // num_programs)
    )

    # Grid (row s, KV head h, query block b, KV split j): program (s, h, b, j) computes the
    # attention of query block b of row s for the Gp query heads of KV head h, over the j-th
    # share of the KV blocks that block can see; the splits are merged below.
    grid = (s, hkv, num_q_blocks, num_splits)
    kernel = functools.partial(
        _attention_kernel,
        block_q=block_q,
        group_pad=group_pad,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        scale_log2=float(scale) * _LOG2E,
    )
    row_spec = pl.BlockSpec((1,), lambda i, h, b, j: (i,))
    pages_spec = pl.BlockSpec((num_pages, page_size, None, d), lambda i, h, b, j: (0, 0, h, 0))
    stat_shape = (num_splits, s, hkv, q_pad * group_pad)
    try:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    except ImportError:  # pragma: no cover - a jax without the Triton backend (interpret only)
        compiler_params = None
    o, m, denom = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            row_spec,
            row_spec,
            pl.BlockSpec((None, p_pad), lambda i, h, b, j: (i, 0)),
            pl.BlockSpec((None, None, rows, d), lambda i, h, b, j: (i, h, b, 0)),
            pages_spec,
            pages_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, h, b, j: (j, i, h, b, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, b, j: (j, i, h, b)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, b, j: (j, i, h, b)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*stat_shape, d), jnp.float32),
            jax.ShapeDtypeStruct(stat_shape, jnp.float32),
            jax.ShapeDtypeStruct(stat_shape, jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="tokencake_ragged_paged_attention",
    )(q_lens, kv_lens, block_tables, qg, k_pages, v_pages)

    # Merge the KV splits (flash-decoding's final step); an empty split has l == 0 and a weight
    # of exp2(MASK - m_max) == 0. Rows that saw no key at all (padding) have l == 0 -> zeros.
    m_max = m.max(axis=0)
    w = jnp.exp2(m - m_max[None])
    l_sum = (w * denom).sum(axis=0)
    o_sum = (w[..., None] * o).sum(axis=0)
    out = jnp.where(l_sum[..., None] > 0, o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None], 0.0)

    out = out.reshape(s, hkv, q_pad, group_pad, d).transpose(0, 2, 1, 3, 4)
    return out[:, :qn, :, :group].reshape(s, qn, hq, d).astype(q.dtype)


def make_backend(interpret: bool | None = None) -> AttentionBackend:
    """The ``pallas-gpu`` backend; ``interpret`` defaults to True unless running on a GPU.

    Interpret mode runs the same kernel through Pallas's HLO interpreter, which is how the CPU
    tests exercise it (slowly: it is a correctness tool, not a CPU serving path).
    """
    if interpret is None:
        interpret = INTERPRET
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "cuda", "rocm")
    if not interpret:
        try:
            from jax.experimental.pallas import triton  # noqa: F401
        except ImportError as e:
            raise ValueError(f"pallas-gpu needs jax's Pallas Triton backend: {e}") from e
    fn = functools.partial(pallas_paged_attention, interpret=bool(interpret))
    return AttentionBackend("pallas-gpu", fn)
