"""Load a GGUF checkpoint (llama.cpp format) into the canonical parameter format.

Quantised tensors are dequantised to float32 with ``gguf.quants.dequantize``. Dequantised
arrays come out as ``(out, in)`` like ``torch.nn.Linear`` weights and are transposed to our
``(in, out)``. llama.cpp's converter permutes the rows of Llama ``attn_q``/``attn_k`` so that
RoPE pairs are adjacent (interleaved / GPT-J layout); we undo that so the model can use the
Hugging Face ``rotate_half`` RoPE for every checkpoint format. Qwen2/Qwen3 GGUFs are not
permuted by the converter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tokencake.models import generation
from tokencake.models.config import ModelConfig
from tokencake.models.weights import unpermute_qk, validate_params

# Architectures whose Q/K rows llama.cpp's converter permutes.
_PERMUTED_ARCHS = ("llama", "mistral")
_SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")

# GGUF per-block tensor name -> (canonical key, is_matrix).
_BLOCK_TENSORS = {
    "attn_norm.weight": ("attn_norm", False),
    "attn_q.weight": ("wq", True),
    "attn_k.weight": ("wk", True),
    "attn_v.weight": ("wv", True),
    "attn_output.weight": ("wo", True),
    "attn_q.bias": ("bq", False),
    "attn_k.bias": ("bk", False),
    "attn_v.bias": ("bv", False),
    "attn_q_norm.weight": ("q_norm", False),
    "attn_k_norm.weight": ("k_norm", False),
    "ffn_norm.weight": ("mlp_norm", False),
    "ffn_gate.weight": ("w_gate", True),
    "ffn_up.weight": ("w_up", True),
    "ffn_down.weight": ("w_down", True),
}


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """Open ``path`` with ``gguf.GGUFReader``, turning low-level failures into clear errors."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise ValueError(f"cannot read GGUF file {p} (corrupt or not a GGUF file?): {e}") from e


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    """Decoded value of metadata field ``key`` (scalars, strings and arrays), or ``default``."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader: Any, name: str = "") -> ModelConfig:
    """Build a :class:`ModelConfig` from GGUF metadata (``<arch>.*`` and ``tokenizer.ggml.*``)."""
    arch = field_value(reader, "general.architecture")
    if arch not in _SUPPORTED:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {_SUPPORTED})")

    def req(key: str) -> Any:
        v = field_value(reader, f"{arch}.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return v

    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    kv_heads = int(field_value(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(
        field_value(reader, f"{arch}.attention.key_length", 0)
        or field_value(reader, f"{arch}.rope.dimension_count", 0)
        or hidden // heads
    )
    tensor_names = {t.name for t in reader.tensors}
    vocab = field_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rope_scaling = None
    scaling_type = field_value(reader, f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {
            "rope_type": "linear",
            "factor": _f32(field_value(reader, f"{arch}.rope.scaling.factor")),
        }
    elif scaling_type not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1 GGUFs bake the scaling into per-frequency factors without the parameters
        # needed to rebuild HF's rope_scaling dict; refuse rather than silently mis-rotate.
        raise ValueError(
            "GGUF has rope_freqs.weight (Llama 3.1 rope scaling); load the HF folder instead"
        )
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = field_value(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=int(req("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_f32(field_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=_f32(req("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(field_value(reader, f"{arch}.context_length", 2048)),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
        name=name,
        sampling_defaults=generation.from_gguf(reader),
    )


def _f32(v: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.9999997e-06)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="0"))


def _dequant(t: Any) -> np.ndarray:
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type)
    return np.asarray(arr, dtype=np.float32)


def load_gguf(
    path: str | os.PathLike[str],
    reader: Any = None,
    name: str | None = None,
    progress: bool = False,
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Load ``path`` into ``(config, params)`` in the canonical float32 format.

    ``reader`` may be an already-open ``gguf.GGUFReader`` of the same file (opening parses the
    whole tokenizer and takes seconds, so callers that also build the tokenizer share it).
    ``progress`` shows a tqdm bar over the dequantized tensors.
    """
    if reader is None:
        reader = open_gguf(path)
    if name is None:
        name = Path(path).name.removesuffix(".gguf")
    cfg = config_from_gguf(reader, name=name)
    tensors = {t.name: t for t in reader.tensors}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tensors), desc="dequantizing GGUF", unit="tensor")

    def get(tname: str) -> np.ndarray:
        if bar is not None:
            bar.update(1)
        t = tensors.get(tname)
        if t is None:
            raise ValueError(f"GGUF file {path} is missing tensor {tname!r}")
        try:
            return _dequant(t)
        except Exception as e:
            raise ValueError(f"cannot dequantize tensor {tname!r} in {path}: {e}") from e

    params: dict[str, np.ndarray] = {
        "embed": get("token_embd.weight"),
        "final_norm": get("output_norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("output.weight").T)

    permuted = cfg.arch in _PERMUTED_ARCHS
    stacked: dict[str, np.ndarray] = {}
    for suffix, (key, is_matrix) in _BLOCK_TENSORS.items():
        if f"blk.0.{suffix}" not in tensors:
            continue
        out = None
        for i in range(cfg.num_layers):
            w = get(f"blk.{i}.{suffix}")
            if permuted and key in ("wq", "bq"):
                w = unpermute_qk(w, cfg.num_heads)
            elif permuted and key in ("wk", "bk"):
                w = unpermute_qk(w, cfg.num_kv_heads)
            if is_matrix:
                w = w.T
            if out is None:
                # Preallocate the stack: avoids holding a list of layers plus a copy.
                out = np.empty((cfg.num_layers, *w.shape), dtype=np.float32)
            out[i] = w
        stacked[key] = out  # type: ignore[assignment]
    params.update(stacked)
    if bar is not None:
        bar.close()
    validate_params(cfg, params)
    return cfg, params
