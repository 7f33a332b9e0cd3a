"""The ``pallas-tpu`` backend: jax's TPU ``ragged_paged_attention`` kernel, adapted to our layout.

On anything but a TPU (or when the kernel cannot be imported or fails its start-up probe),
:func:`make_backend` logs why and returns the *reference* backend, named ``"reference"`` so callers
can tell.

Layout conversion, a known per-call cost
----------------------------------------
jax's kernel (``jax.experimental.pallas.ops.tpu.ragged_paged_attention``) wants

* ``kv_pages[num_pages, page_size, 2 * Hkv, D]``: K and V of a head interleaved (K of head ``h``
  at combined index ``2h``, V at ``2h + 1``), whereas the engine stores K and V as two
  ``[num_pages, page_size, Hkv, D]`` arrays (``memory/kv_cache.py``);
* ``q[T, Hq, D]``: all rows' valid query tokens packed back to back, delimited by ``cu_q_lens``,
  whereas the engine passes a padded ``q[S, Q, Hq, D]``.

:func:`tpu_ragged_paged_attention` therefore interleaves K and V into a fresh array **on every
call** -- a full read and write of the layer's KV cache, which costs about as much HBM traffic as
the attention itself -- and packs/unpacks the queries (cheap). This keeps the engine's one KV
layout; if TPU serving matters, the fix is a TPU-specific cache layout (the combined array) owned
by the KV cache, not a faster conversion.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tokencake.models.attention.backend import AttentionBackend
from tokencake.models.attention.reference import reference_paged_attention

log = logging.getLogger(__name__)

RaggedKernel = Callable[..., jax.Array]


def interleave_kv(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
    """``[N, page, Hkv, D]`` x2 -> ``[N, page, 2*Hkv, D]`` with K at even and V at odd heads.

    This materialises a new array the size of K and V together (the per-call cost noted above).
    """
    n, page, hkv, d = k_pages.shape
    return jnp.stack([k_pages, v_pages], axis=3).reshape(n, page, 2 * hkv, d)


def pack_queries(q: jax.Array, q_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Padded ``q[S, Q, Hq, D]`` -> packed ``[S*Q, Hq, D]`` and ``cu_q_lens[S+1]``.

    Token ``t < cu_q_lens[S]`` of the packed array is query ``t - cu_q_lens[s]`` of the row ``s``
    whose span contains it; slots past the total are zero (the kernel never reads them as queries).
    """
    s, qn, hq, d = q.shape
    q_lens = q_lens.astype(jnp.int32)
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens, dtype=jnp.int32)])
    t = jnp.arange(s * qn, dtype=jnp.int32)
    row = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, s - 1)
    idx = jnp.clip(t - cu_q_lens[row], 0, qn - 1)
    packed = q[row, idx]
    return jnp.where((t < cu_q_lens[-1])[:, None, None], packed, 0), cu_q_lens


def unpack_outputs(out: jax.Array, cu_q_lens: jax.Array, q_lens: jax.Array, qn: int) -> jax.Array:
    """Packed ``[T, Hq, D]`` -> padded ``[S, Q, Hq, D]`` with zeros past each row's ``q_len``."""
    s = q_lens.shape[0]
    i = jnp.arange(qn, dtype=jnp.int32)
    src = jnp.clip(cu_q_lens[:s, None] + i[None, :], 0, out.shape[0] - 1)
    valid = i[None, :] < q_lens.astype(jnp.int32)[:, None]
    return jnp.where(valid[..., None, None], out[src], 0)


def tpu_ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    kernel: RaggedKernel | None = None,
) -> jax.Array:
    """Our backend signature on top of jax's TPU ragged kernel (or any kernel with its signature).

    ``kernel`` defaults to ``ragged_paged_attention``; tests pass the kernel module's pure-jnp
    ``ref_ragged_paged_attention`` to check the layout conversion on CPU. Converts the layout on
    every call (see the module docstring for the cost).
    """
    if kernel is None:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

        kernel = ragged_paged_attention
    s, qn, _, _ = q.shape
    packed, cu_q_lens = pack_queries(q, q_lens)
    kv_lens = kv_lens.astype(jnp.int32)
    # Padding rows (q_len 0) keep kv_len 0 so the kernel does no work for them.
    kv_lens = jnp.where(q_lens > 0, kv_lens, 0)
    out = kernel(
        packed,
        interleave_kv(k_pages, v_pages),
        kv_lens,
        block_tables.astype(jnp.int32),
        cu_q_lens,
        jnp.array([s], jnp.int32),
        sm_scale=scale,
    )
    if out.shape[0] < packed.shape[0]:  # the pure-jnp reference returns only the valid tokens
        out = jnp.pad(out, ((0, packed.shape[0] - out.shape[0]), (0, 0), (0, 0)))
    return unpack_outputs(out, cu_q_lens, q_lens, qn).astype(q.dtype)


def _tpu_or_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    kernel: RaggedKernel,
) -> jax.Array:
    """The TPU kernel when it supports these head counts, else the reference (decided at trace).

    jax's kernel only tiles ``2 * Hkv`` combined heads of 1, 2, 4, 8 or a multiple of 8 (after
    dtype packing); e.g. SmolLM2-135M's 3 KV heads are refused, so those shapes use the reference.
    """
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import (
        get_min_heads_per_blk,
    )

    try:
        get_min_heads_per_blk(q.shape[2], 2 * k_pages.shape[2], q.dtype, k_pages.dtype)
    except Exception as e:  # NotImplementedError today; any refusal means the same
        log.warning("pallas-tpu: %s; these shapes use the reference backend", e)
        return reference_paged_attention(
            q, k_pages, v_pages, block_tables, q_lens, kv_lens, scale=scale
        )
    return tpu_ragged_paged_attention(
        q, k_pages, v_pages, block_tables, q_lens, kv_lens, scale=scale, kernel=kernel
    )


def _probe(fn: Callable[..., jax.Array]) -> None:
    """Run ``fn`` once on a tiny mixed batch and compare it with the reference (raises on error)."""
    rng = np.random.default_rng(0)
    hq, hkv, d, page = 8, 1, 128, 16
    q = jnp.asarray(rng.standard_normal((2, 4, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((5, page, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((5, page, hkv, d)), jnp.float32)
    args = (q, k, v, jnp.array([[1, 2], [3, 0]], jnp.int32), jnp.array([4, 1]), jnp.array([20, 9]))
    got = fn(*args, scale=d**-0.5)
    want = reference_paged_attention(*args, scale=d**-0.5)
    err = float(jnp.max(jnp.abs(got - want)))
    # The TPU kernel computes in bf16 internally; 5e-2 separates "works" from "wrong layout".
    if not err < 5e-2:
        raise RuntimeError(f"TPU kernel disagrees with the reference (max abs err {err:.3g})")


def make_backend() -> AttentionBackend:
    """The TPU kernel backend, or the reference backend (with a logged warning) when unavailable."""
    reference = AttentionBackend("reference", reference_paged_attention)
    platform = jax.default_backend()
    if platform != "tpu":
        log.warning("pallas-tpu: not on a TPU (platform %r); using the reference backend", platform)
        return reference
    try:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
            ragged_paged_attention,
        )

        fn = jax.jit(
            functools.partial(_tpu_or_reference, kernel=ragged_paged_attention),
            static_argnames=("scale",),
        )
        _probe(fn)
    except Exception as e:  # any import, lowering or numeric failure means "don't use it"
        log.warning(
            "pallas-tpu: TPU ragged kernel unusable (%s: %s); using the reference backend",
            type(e).__name__,
            e,
        )
        return reference
    return AttentionBackend("pallas-tpu", fn)
