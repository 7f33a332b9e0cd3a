"""Load a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``) without torch.

Tensors are read with ``safetensors.safe_open(framework="numpy")``. numpy has no bfloat16, so
bf16 tensors (the usual HF storage dtype) are read as raw bytes and widened to float32 by hand.
HF ``nn.Linear`` weights are ``(out, in)`` and are transposed to the canonical ``(in, out)``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from tokencake.models import generation
from tokencake.models.config import ModelConfig
from tokencake.models.weights import validate_params

# HF per-layer name (after ``model.layers.{i}.``) -> (canonical key, transpose).
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
# Canonical key -> HF per-layer name (the inverse, used when writing test checkpoints).
CANONICAL_TO_HF = {key: (name, t) for name, (key, t) in _LAYER_NAMES.items()}


def _safetensor_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({d / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"safetensors shards listed in {index.name} are missing: {missing}"
            )
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {d}")
    return files


def _read_bf16_as_f32(path: Path) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file whose dtype numpy can't represent (BF16) as f32.

    The format is an 8-byte little-endian header length, a JSON header with per-tensor dtype,
    shape and byte offsets, then the raw data; bf16 is the top half of an f32.
    """
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] != "BF16":
                continue
            start, end = info["data_offsets"]
            raw = np.frombuffer(mm[base + start : base + end], dtype="<u2")
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All tensors in one ``.safetensors`` file as float32 numpy arrays."""
    from safetensors import safe_open

    p = Path(path)
    out: dict[str, np.ndarray] = {}
    bf16: dict[str, np.ndarray] | None = None
    with safe_open(str(p), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open handles aren't iterable)
            try:
                arr = f.get_tensor(name)
            except (TypeError, ValueError):
                # numpy can't hold bf16; decode the raw bytes of the whole file once.
                if bf16 is None:
                    bf16 = _read_bf16_as_f32(p)
                if name not in bf16:
                    raise
                arr = bf16[name]
            out[name] = np.asarray(arr, dtype=np.float32)
    return out


def params_from_hf_state(cfg: ModelConfig, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map an HF state dict (``model.layers.{i}...``, ``(out, in)`` weights) to canonical params."""

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"HF checkpoint is missing tensor {name!r}")
        return state[name]

    params: dict[str, np.ndarray] = {
        "embed": get("model.embed_tokens.weight"),
        "final_norm": get("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("lm_head.weight").T)
    for suffix, (key, transpose) in _LAYER_NAMES.items():
        if f"model.layers.0.{suffix}" not in state:
            continue
        layers = []
        for i in range(cfg.num_layers):
            w = get(f"model.layers.{i}.{suffix}")
            layers.append(w.T if transpose else w)
        params[key] = np.ascontiguousarray(np.stack(layers))
    if cfg.attention_bias and "bq" not in params:
        # Some Qwen2-style configs declare biases that a checkpoint variant omits; zeros are exact.
        params["bq"] = np.zeros((cfg.num_layers, cfg.q_size), np.float32)
        params["bk"] = np.zeros((cfg.num_layers, cfg.kv_size), np.float32)
        params["bv"] = np.zeros((cfg.num_layers, cfg.kv_size), np.float32)
    validate_params(cfg, params)
    return params


def load_hf_folder(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Load ``config.json`` and the safetensors weights (single file, sharded index or glob)."""
    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {d}")
    hf_cfg: dict[str, Any] = json.loads(cfg_file.read_text())
    cfg = ModelConfig.from_hf_config(hf_cfg, name=d.name)
    cfg = cfg.replace(sampling_defaults=generation.from_hf_folder(d))
    state: dict[str, np.ndarray] = {}
    for f in _safetensor_files(d):
        state.update(read_safetensors(f))
    if "lm_head.weight" in state and cfg.tie_word_embeddings:
        # Tied checkpoints sometimes store a copy of the embedding; it is redundant.
        state.pop("lm_head.weight")
    elif "lm_head.weight" not in state and not cfg.tie_word_embeddings:
        raise ValueError(f"{d}: config says untied embeddings but there is no lm_head.weight")
    return cfg, params_from_hf_state(cfg, state)


def hf_state_from_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_hf_state` (writes HF names, ``(out, in)`` weights)."""
    state = {
        "model.embed_tokens.weight": params["embed"],
        "model.norm.weight": params["final_norm"],
    }
    if "lm_head" in params:
        state["lm_head.weight"] = np.ascontiguousarray(params["lm_head"].T)
    for key, (name, transpose) in CANONICAL_TO_HF.items():
        if key not in params:
            continue
        for i in range(cfg.num_layers):
            w = params[key][i]
            state[f"model.layers.{i}.{name}"] = np.ascontiguousarray(w.T if transpose else w)
    return state
