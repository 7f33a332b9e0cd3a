"""One Flax decoder for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3).

Differences between the architectures are config switches (``attention_bias`` for Qwen2's q/k/v
biases, ``qk_norm`` for Qwen3's per-head RMSNorm, ``rope_scaling`` for Llama 3, tied or untied
LM head). The layer body is traced once and run in a rolled loop (``layer_loop``, see
:data:`LAYER_LOOPS`): a ``lax.scan`` over stacked weights, or on CPU a ``fori_loop`` whose dots
pick per-layer weight arrays with ``lax.switch`` so that they read the weights in place. The
paged KV cache rides in the loop carry so XLA updates it in place (the cache is donated by the
caller).

The forward works on the engine's ragged batch: ``input_ids[S, Q]`` where row ``s`` holds
``q_lens[s]`` new tokens of one sequence (a prefill chunk or a single decode token) whose
context, including the new tokens, is ``kv_lens[s]`` long.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tokencake.memory.kv_cache import DUMMY_PAGE
from tokencake.models import sharding
from tokencake.models.attention.backend import LayerAttentionFn
from tokencake.models.config import ModelConfig
from tokencake.models.host_arena import HostArena
from tokencake.models.rope import apply_rope, inv_frequencies
from tokencake.models.weights import validate_params

LAYER_KEYS = (
    "attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm", "k_norm",
    "mlp_norm", "w_gate", "w_up", "w_down",
)  # fmt: skip
MATRIX_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# With ``fuse_projections`` the matrices that read the same input are concatenated along
# their output axis: q/k/v into "wqkv", gate/up into "w_gate_up" (4 dots a layer, not 7).
FUSED_MATRIX_KEYS = ("wqkv", "wo", "w_gate_up", "w_down")
_FUSED_PARTS = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
# How the layers are looped over (see DecoderLM):
#   "scan":   lax.scan over stacked weights -- one compiled layer body; XLA:CPU copies every
#             matrix out of the stack before its dot (the GPU/TPU default).
#   "switch": a fori_loop over layers whose dots pick their matrix with lax.switch from
#             per-layer arrays, so each dot reads its weights in place; the layer body's fusions
#             compile once. The CPU default.
#   "unroll": a Python loop over per-layer arrays; in place too, but every fusion compiles once
#             per layer (about 5x the compile time of the others).
LAYER_LOOPS = ("scan", "switch", "unroll")


def project(h: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """``h @ W`` for a matrix stored ``[in, out]``, or stored ``[out, in]`` when ``transposed``
    (contracting ``h``'s last axis with ``w``'s last: XLA reads ``w`` in place, no transpose).

    A matrix narrower than ``h`` (``weight_dtype="bfloat16"`` under float32 compute) is
    multiplied as llama.cpp's BF16 path does: ``h`` rounded to the matrix's dtype, products
    summed in ``h``'s dtype; the result has ``h``'s dtype."""
    if w.dtype == h.dtype:
        if not transposed:
            return h @ w
        return jax.lax.dot_general(h, w, (((h.ndim - 1,), (1,)), ((), ())))
    lead = h.shape[:-1]
    x = h.reshape(-1, h.shape[-1]).astype(w.dtype)
    rows = x.shape[0]
    if rows == 1:
        # XLA:CPU runs a one-row dot as its own GEMV, which has no fast bfloat16 path (5-6x
        # the float32 time); two rows go to YNNPACK's bfloat16 GEMM (bench/RESULTS.md §7).
        x = jnp.concatenate([x, jnp.zeros_like(x)])
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=h.dtype)
    return y[:rows].reshape(*lead, y.shape[-1])


class Batch(NamedTuple):
    """Device inputs of one step (all int32)."""

    input_ids: jax.Array  # [S, Q]
    positions: jax.Array  # [S, Q]
    q_lens: jax.Array  # [S]
    kv_lens: jax.Array  # [S]
    block_tables: jax.Array  # [S, P]


def _packed(arrays: Sequence[jax.Array]) -> jax.Array:
    """Arrays ``[S_g, Q_g]`` flattened and concatenated into one ``[sum S_g * Q_g]``."""
    flat = [a.reshape(-1) for a in arrays]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat)


def matrices_of(params: dict[str, np.ndarray], fuse: bool) -> dict[str, np.ndarray]:
    """The layer matrices (stacked ``[L, in, out]``) by the key the model reads them under:
    :data:`MATRIX_KEYS`, or with ``fuse`` :data:`FUSED_MATRIX_KEYS` (parts concatenated)."""
    if not fuse:
        return {k: params[k] for k in MATRIX_KEYS}
    return {
        k: np.concatenate([params[p] for p in _FUSED_PARTS[k]], axis=-1)
        if k in _FUSED_PARTS
        else params[k]
        for k in FUSED_MATRIX_KEYS
    }


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def slot_indices(batch: Batch, page_size: int) -> tuple[jax.Array, jax.Array]:
    """Page and in-page offset each token's K/V is written to; padding goes to the dummy page."""
    s, q = batch.input_ids.shape
    valid = jnp.arange(q)[None, :] < batch.q_lens[:, None]
    page_idx = jnp.clip(batch.positions // page_size, 0, batch.block_tables.shape[1] - 1)
    pages = jnp.take_along_axis(batch.block_tables, page_idx, axis=1)
    pages = jnp.where(valid, pages, DUMMY_PAGE)
    return pages, batch.positions % page_size


class DecoderLM(nnx.Module):
    """Llama-family causal LM over a paged KV cache. Weights in the canonical format
    of ``models/weights.py``; ``dtype`` is the compute and storage dtype; ``layer_loop`` is one
    of :data:`LAYER_LOOPS`; ``mesh`` (optional) shards the weights for tensor parallelism.
    ``fuse_projections`` (one device only: tensor parallelism shards q, k and v by head, each
    on its own) concatenates the matrices that read the same input, so a layer runs 4 dots
    instead of 7; the sums are the same, computed in one dot per group.
    ``transpose_weights`` (one device only) stores every matrix ``[out, in]``, each output's
    weights contiguous: on XLA:CPU a dot of a few rows (a decode batch) streams those rows
    faster than the ``[in, out]`` columns, and large-M dots (prefill) do not care.
    ``weight_dtype`` (default: ``dtype``) stores the matrices, the embedding and the LM head
    in that dtype; with ``"bfloat16"`` under float32 compute the dots round their inputs to
    bfloat16 and sum in float32 (:func:`project`), and the rest (norms, RoPE, attention, the
    residual stream, the KV cache) stays float32."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict[str, np.ndarray],
        dtype: str = "float32",
        layer_loop: str = "scan",
        mesh: Mesh | None = None,
        pack_weights: bool = False,
        fuse_projections: bool = False,
        transpose_weights: bool = False,
        weight_dtype: str | None = None,
    ):
        validate_params(cfg, params)
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        # which combinations make sense is checked by tokencake.config.check_weight_dtype
        self.weight_dtype = jnp.dtype(weight_dtype or dtype)
        self.layer_loop = layer_loop
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        per_layer = layer_loop != "scan"
        self.fused = fuse_projections and mesh is None
        self.matrix_keys = FUSED_MATRIX_KEYS if self.fused else MATRIX_KEYS
        self.transposed = transpose_weights and mesh is None
        mats = matrices_of(params, self.fused)
        head = ("lm_head", params["lm_head"]) if "lm_head" in params else ("embed", params["embed"])
        if self.transposed:
            mats = {k: np.swapaxes(v, -1, -2) for k, v in mats.items()}
            if head[0] == "lm_head":
                head = ("lm_head", head[1].T)  # [V, H], the same layout as a tied head
        # With ``pack_weights`` (one CPU device) the per-layer matrices and the head are packed
        # back to back into one huge-page host buffer in read order -- layer by layer, then the
        # head -- so a decode step streams them like one array (see host_arena.py).
        arena = None
        if pack_weights and mesh is None:
            streamed = [mats[k][i] for i in range(cfg.num_layers) for k in self.matrix_keys]
            arena = HostArena(
                HostArena.size_of([*(streamed if per_layer else []), head[1]], self.weight_dtype)
            )
        matrix_like = {*self.matrix_keys, *MATRIX_KEYS, "lm_head", "embed"}

        def place(key: str, value, one_layer: bool = False) -> nnx.Param:
            dtype = self.weight_dtype if key in matrix_like else self.dtype
            if mesh is not None:
                spec = NamedSharding(mesh, sharding.param_spec(key, one_layer))
                return nnx.Param(jax.device_put(np.asarray(value, dtype), spec))
            if arena is not None and (one_layer or key == head[0]):
                return nnx.Param(arena.put(value, dtype))
            return nnx.Param(jnp.asarray(value, dtype))

        # Matrices: one array per layer unless the loop is a scan. Norm and bias vectors stay
        # stacked (indexing them by layer costs nothing).
        self.matrices = nnx.List(
            [
                nnx.Dict({k: place(k, mats[k][i], one_layer=True) for k in self.matrix_keys})
                for i in range(cfg.num_layers)
            ]
            if per_layer
            else []
        )
        vectors = {k: params[k] for k in LAYER_KEYS if k in params and k not in MATRIX_KEYS}
        stacked = vectors if per_layer else {**mats, **vectors}
        self.layers = nnx.Dict({k: place(k, v) for k, v in stacked.items()})
        self.lm_head = place("lm_head", head[1]) if head[0] == "lm_head" else None
        self.embed = place("embed", params["embed"])
        self.final_norm = place("final_norm", params["final_norm"])

    def __call__(
        self,
        batch: Batch | Sequence[Batch],
        k_cache: jax.Array,
        v_cache: jax.Array,
        attention: LayerAttentionFn,
    ) -> tuple[jax.Array | tuple[jax.Array, ...], jax.Array, jax.Array]:
        """Run the layers; returns final hidden states ``[S, Q, H]`` and the updated caches.

        ``batch`` may also be a sequence of groups (a fused step, ``tokencake/fused.py``): the
        dense parts (embedding, projections, RoPE, MLP, norms) and the KV writes run once over
        every group's tokens packed together, and attention runs per group with the group's
        own shape, so a decode row is not padded to a prefill chunk's length. The hidden
        states then come back as one ``[S, Q, H]`` array per group."""
        cfg = self.cfg
        groups = (batch,) if isinstance(batch, Batch) else tuple(batch)
        shapes = [g.input_ids.shape for g in groups]
        sizes = [s * q for s, q in shapes]
        t = sum(sizes)
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        page_size = k_cache.shape[2]
        # Every group's tokens packed into one [T] sequence: a token's dense work does not
        # depend on its row, so one weight read serves all groups.
        slots = [slot_indices(g, page_size) for g in groups]
        pages = _packed([p for p, _ in slots])
        offsets = _packed([o for _, o in slots])
        positions = _packed([g.positions for g in groups])
        scale = 1.0 / float(np.sqrt(d))
        x = self.embed[...][_packed([g.input_ids for g in groups])].astype(self.dtype)  # [T, H]

        def layer(x, kc, vc, w, mm, li):
            """One decoder layer; ``w`` holds this layer's vectors, ``mm(h, key)`` its matmuls."""
            h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
            if self.fused:
                qx, kx, vx = jnp.split(mm(h, "wqkv"), [hq * d, (hq + hkv) * d], axis=-1)
            else:
                qx, kx, vx = mm(h, "wq"), mm(h, "wk"), mm(h, "wv")
            if "bq" in w:
                qx, kx, vx = qx + w["bq"], kx + w["bk"], vx + w["bv"]
            qx = qx.reshape(t, hq, d)
            kx = kx.reshape(t, hkv, d)
            vx = vx.reshape(t, hkv, d)
            if "q_norm" in w:
                qx = rms_norm(qx, w["q_norm"], cfg.rms_norm_eps)
                kx = rms_norm(kx, w["k_norm"], cfg.rms_norm_eps)
            qx = apply_rope(qx, positions, self.inv_freq)
            kx = apply_rope(kx, positions, self.inv_freq)
            # Write-then-attend: the new tokens' K/V land in their pages first, so attention
            # reads the whole context (cached prefix + this chunk) from one place. Groups hold
            # different sequences, so their writes never touch each other's pages.
            kc = kc.at[li, pages, offsets].set(kx.astype(kc.dtype))
            vc = vc.at[li, pages, offsets].set(vx.astype(vc.dtype))
            outs, start = [], 0
            for g, (s, q), n in zip(groups, shapes, sizes, strict=True):
                a = attention(
                    qx[start : start + n].reshape(s, q, hq, d), kc, vc,
                    g.block_tables, g.q_lens, g.kv_lens, scale=scale, layer=li,
                )  # fmt: skip
                outs.append(a.reshape(n, hq * d))
                start += n
            attn = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
            x = x + mm(attn, "wo")
            h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
            if self.fused:
                gate, up = jnp.split(mm(h, "w_gate_up"), 2, axis=-1)
            else:
                gate, up = mm(h, "w_gate"), mm(h, "w_up")
            x = x + mm(jax.nn.silu(gate) * up, "w_down")
            return x, kc, vc

        vectors = {k: self.layers[k][...] for k in self.layers}
        dot = partial(project, transposed=self.transposed)
        if self.layer_loop == "scan":

            def scan_body(carry, w):
                x, kc, vc, li = carry
                x, kc, vc = layer(x, kc, vc, w, lambda h, key: dot(h, w[key]), li)
                return (x, kc, vc, li + 1), None

            (x, k_cache, v_cache, _), _ = jax.lax.scan(
                scan_body, (x, k_cache, v_cache, jnp.int32(0)), vectors
            )
        elif self.layer_loop == "unroll":
            for li, mats in enumerate(self.matrices):
                w = {k: v[li] for k, v in vectors.items()}
                x, k_cache, v_cache = layer(
                    x, k_cache, v_cache, w, lambda h, key, m=mats: dot(h, m[key][...]), li
                )
        else:
            mats = {k: [m[k][...] for m in self.matrices] for k in self.matrix_keys}

            def switch_body(li, carry):
                x, kc, vc = carry
                w = {k: v[li] for k, v in vectors.items()}

                def mm(h, key):
                    # Branch j multiplies by layer j's matrix: the dot reads that buffer in
                    # place, where indexing a stacked array would copy the slice first.
                    return jax.lax.switch(li, [partial(dot, w=m) for m in mats[key]], h)

                return layer(x, kc, vc, w, mm, li)

            x, k_cache, v_cache = jax.lax.fori_loop(
                0, cfg.num_layers, switch_body, (x, k_cache, v_cache)
            )
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        hidden, start = [], 0
        for (s, q), n in zip(shapes, sizes, strict=True):
            hidden.append(x[start : start + n].reshape(s, q, -1))
            start += n
        return (hidden[0] if isinstance(batch, Batch) else tuple(hidden)), k_cache, v_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits for hidden states ``[..., H]``."""
        if self.lm_head is not None:
            return project(hidden, self.lm_head[...], self.transposed).astype(jnp.float32)
        # Tied head: contract against the embedding's hidden axis directly; writing
        # ``embed.T`` makes XLA:CPU materialise a [H, V] transpose on every step.
        return project(hidden, self.embed[...], True).astype(jnp.float32)
