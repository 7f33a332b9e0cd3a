"""The canonical parameter format every loader produces and the model consumes.

Parameters are a flat ``dict[str, np.ndarray]`` (float32 unless stated otherwise). Per-layer
tensors are stacked on axis 0 (``L``) so the model can ``lax.scan`` over them, and matrices are
stored in ``x @ W`` orientation, i.e. ``(in, out)``:

==============  ==================  ==========================================
key             shape               present
==============  ==================  ==========================================
``embed``       ``[V, H]``          always
``lm_head``     ``[H, V]``          only when embeddings are untied
``final_norm``  ``[H]``             always
``attn_norm``   ``[L, H]``          always
``wq``          ``[L, H, Hq*D]``    always
``wk``/``wv``   ``[L, H, Hkv*D]``   always
``wo``          ``[L, Hq*D, H]``    always
``bq``          ``[L, Hq*D]``       ``attention_bias``
``bk``/``bv``   ``[L, Hkv*D]``      ``attention_bias``
``q_norm``      ``[L, D]``          ``qk_norm``
``k_norm``      ``[L, D]``          ``qk_norm``
``mlp_norm``    ``[L, H]``          always
``w_gate``      ``[L, H, F]``       always
``w_up``        ``[L, H, F]``       always
``w_down``      ``[L, F, H]``       always
==============  ==================  ==========================================

Q/K output channels are in Hugging Face order (each head's first half of channels rotates
with its second half, ``rotate_half`` RoPE); GGUF's interleaved order is undone at load time
with :func:`unpermute_qk`.
"""

from __future__ import annotations

import numpy as np

from tokencake.models.config import ModelConfig

NORM_KEYS = ("final_norm", "attn_norm", "mlp_norm", "q_norm", "k_norm")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter ``cfg`` requires, keyed by canonical name."""
    v, h, f, n = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv, d = cfg.q_size, cfg.kv_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (v, h),
        "final_norm": (h,),
        "attn_norm": (n, h),
        "wq": (n, h, q),
        "wk": (n, h, kv),
        "wv": (n, h, kv),
        "wo": (n, q, h),
        "mlp_norm": (n, h),
        "w_gate": (n, h, f),
        "w_up": (n, h, f),
        "w_down": (n, f, h),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, v)
    if cfg.attention_bias:
        shapes.update(bq=(n, q), bk=(n, kv), bv=(n, kv))
    if cfg.qk_norm:
        shapes.update(q_norm=(n, d), k_norm=(n, d))
    return shapes


def validate_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> None:
    """Raise ``ValueError`` naming the first missing, unexpected or mis-shaped parameter."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in params]
    if missing:
        raise ValueError(f"params missing key(s) {missing} required by config {cfg.name!r}")
    extra = sorted(set(params) - set(shapes))
    if extra:
        # An extra lm_head with tied embeddings (or biases without attention_bias) would be
        # silently ignored by the model; better to flag the config/weights mismatch.
        raise ValueError(f"params have unexpected key(s) {extra} for config {cfg.name!r}")
    for k, shape in shapes.items():
        got = tuple(np.shape(params[k]))
        if got != shape:
            raise ValueError(f"param {k!r} has shape {got}, expected {shape}")


def random_params(cfg: ModelConfig, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Random weights for tests: ``normal * 0.02`` matrices and biases, all-ones norms."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for k, shape in expected_shapes(cfg).items():
        if k in NORM_KEYS:
            out[k] = np.ones(shape, dtype=dtype)
        else:
            out[k] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
    return out


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> GGUF row order for a ``(out, in)`` Q or K matrix (llama.cpp's converter permute).

    Within each head, HF row ``i`` (first half) and ``i + D/2`` (second half) become the
    adjacent GGUF rows ``2i`` and ``2i + 1``. Also works on 1-D biases.
    """
    out = w.shape[0]
    hd = out // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF -> HF row order for a ``(out, in)`` Q or K matrix; inverse of :func:`permute_qk`."""
    out = w.shape[0]
    hd = out // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def param_count(params: dict[str, np.ndarray]) -> int:
    """Total number of scalars in ``params``."""
    return int(sum(np.size(v) for v in params.values()))
