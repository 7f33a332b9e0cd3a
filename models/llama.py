"""One Flax decoder for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3).

Differences between the architectures are config switches (``attention_bias`` for Qwen2's q/k/v
biases, ``qk_norm`` for Qwen3's per-head RMSNorm, ``rope_scaling`` for Llama 3, tied or untied
LM head). Layers are stacked on a leading axis and run with ``lax.scan`` so a step compiles the
layer body once; the paged KV cache rides in the scan carry so XLA updates it in place (the
cache is donated by the caller).

The forward works on the engine's ragged batch: ``input_ids[S, Q]`` where row ``s`` holds
``q_lens[s]`` new tokens of one sequence (a prefill chunk or a single decode token) whose
context, including the new tokens, is ``kv_lens[s]`` long.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokencake.memory.kv_cache import DUMMY_PAGE
from tokencake.models.attention.backend import AttentionFn
from tokencake.models.config import ModelConfig
from tokencake.models.rope import apply_rope, inv_frequencies
from tokencake.models.weights import validate_params

LAYER_KEYS = (
    "attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm", "k_norm",
    "mlp_norm", "w_gate", "w_up", "w_down",
)  # fmt: skip


class Batch(NamedTuple):
    """Device inputs of one step (all int32)."""

    input_ids: jax.Array  # [S, Q]
    positions: jax.Array  # [S, Q]
    q_lens: jax.Array  # [S]
    kv_lens: jax.Array  # [S]
    block_tables: jax.Array  # [S, P]


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
    of ``models/weights.py``; ``dtype`` is the compute and storage dtype."""

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray], dtype: str = "float32"):
        validate_params(cfg, params)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.embed = nnx.Param(jnp.asarray(params["embed"], self.dtype))
        self.final_norm = nnx.Param(jnp.asarray(params["final_norm"], self.dtype))
        self.lm_head = (
            nnx.Param(jnp.asarray(params["lm_head"], self.dtype)) if "lm_head" in params else None
        )
        self.layer_keys = tuple(k for k in LAYER_KEYS if k in params)
        self.layers = nnx.Dict(
            {k: nnx.Param(jnp.asarray(params[k], self.dtype)) for k in self.layer_keys}
        )

    def layer_params(self) -> dict[str, jax.Array]:
        return {k: self.layers[k][...] for k in self.layer_keys}

    def head_weight(self) -> jax.Array:
        """``[H, V]`` LM-head matrix (the transposed embedding when tied)."""
        return self.lm_head[...] if self.lm_head is not None else self.embed[...].T

    def __call__(
        self,
        batch: Batch,
        k_cache: jax.Array,
        v_cache: jax.Array,
        attention: AttentionFn,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Run the layers; returns final hidden states ``[S, Q, H]`` and the updated caches."""
        cfg = self.cfg
        s, q = batch.input_ids.shape
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        page_size = k_cache.shape[2]
        pages, offsets = slot_indices(batch, page_size)
        scale = 1.0 / float(np.sqrt(d))
        x = self.embed[...][batch.input_ids]

        def layer(carry, w):
            x, kc, vc, li = carry
            h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
            qx, kx, vx = h @ w["wq"], h @ w["wk"], h @ w["wv"]
            if "bq" in w:
                qx, kx, vx = qx + w["bq"], kx + w["bk"], vx + w["bv"]
            qx = qx.reshape(s, q, hq, d)
            kx = kx.reshape(s, q, hkv, d)
            vx = vx.reshape(s, q, hkv, d)
            if "q_norm" in w:
                qx = rms_norm(qx, w["q_norm"], cfg.rms_norm_eps)
                kx = rms_norm(kx, w["k_norm"], cfg.rms_norm_eps)
            qx = apply_rope(qx, batch.positions, self.inv_freq)
            kx = apply_rope(kx, batch.positions, self.inv_freq)
            # Write-then-attend: the new tokens' K/V land in their pages first, so attention
            # reads the whole context (cached prefix + this chunk) from one place.
            kc = kc.at[li, pages, offsets].set(kx.astype(kc.dtype))
            vc = vc.at[li, pages, offsets].set(vx.astype(vc.dtype))
            attn = attention(
                qx, kc[li], vc[li], batch.block_tables, batch.q_lens, batch.kv_lens, scale=scale
            )
            x = x + attn.reshape(s, q, hq * d) @ w["wo"]
            h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
            x = x + (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
            return (x, kc, vc, li + 1), None

        (x, k_cache, v_cache, _), _ = jax.lax.scan(
            layer, (x, k_cache, v_cache, jnp.int32(0)), self.layer_params()
        )
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), k_cache, v_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits for hidden states ``[..., H]``."""
        if self.lm_head is not None:
            return (hidden @ self.lm_head[...]).astype(jnp.float32)
        # Tied head: contract against the embedding's hidden axis directly; writing
        # ``embed.T`` makes XLA:CPU materialise a [H, V] transpose on every step.
        return jnp.einsum("...h,vh->...v", hidden, self.embed[...]).astype(jnp.float32)
