"""Helpers for the loading/tokenizer tests: synthetic HF and GGUF checkpoints of tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tokencake.models.config import ModelConfig
from tokencake.models.hf_loader import hf_state_from_params
from tokencake.models.tokenizer import Tokenizer
from tokencake.models.weights import permute_qk

FRANCE_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
]  # fmt: skip

TRICKY_TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines  ",
    "数字 12345 and CJK 你好，世界",
    "emoji 🌍🚀 family 👨‍👩‍👧 flags 🇫🇷",
    "naïve café — “quotes” ß",
    "def f(x):\n    return x ** 2  # code",
]


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A Hugging Face ``config.json`` dict describing ``cfg``."""
    arch_cls = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }[cfg.arch]
    d = {
        "architectures": [arch_cls],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "torch_dtype": "float32",
    }
    return d


def write_hf_checkpoint(
    d: Path,
    cfg: ModelConfig,
    params: dict[str, np.ndarray],
    dtype: str = "float32",
    shards: int = 1,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write ``params`` as a HF folder (config.json + safetensors, optionally sharded/bf16)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    state = {
        k: np.ascontiguousarray(v.astype(np_dtype))
        for k, v in hf_state_from_params(cfg, params).items()
    }
    names = sorted(state)
    if shards == 1:
        save_file(state, str(d / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[s::shards]}
            save_file(part, str(d / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer is not None:
        tokenizer.save(d)
    return d


def write_gguf(
    path: Path, cfg: ModelConfig, params: dict[str, np.ndarray], tokenizer: Tokenizer
) -> Path:
    """Write an F32 GGUF the way llama.cpp's converter would (Q/K rows permuted for llama)."""
    import gguf

    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    # Tokenizer in GGUF form: byte-level token strings, merges, token types (3 = control).
    vocab = tokenizer.hf.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.hf.all_special_tokens) | {
        t for t in tokens if t.startswith("<") and t.endswith(">")
    }
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([])
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_chat_template(tokenizer.chat_template)
    sampling = cfg.sampling_defaults  # llama.cpp's general.sampling.* keys
    if "temperature" in sampling:
        w.add_sampling_temp(sampling["temperature"])
    if "top_p" in sampling:
        w.add_sampling_top_p(sampling["top_p"])
    if "top_k" in sampling:
        w.add_sampling_top_k(int(sampling["top_k"]))

    def lin(name: str, m: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(m.T.astype(np.float32)))  # (out, in) on disk

    w.add_tensor("token_embd.weight", params["embed"].astype(np.float32))
    w.add_tensor("output_norm.weight", params["final_norm"].astype(np.float32))
    if "lm_head" in params:
        lin("output.weight", params["lm_head"])
    permute = cfg.arch in ("llama", "mistral")
    for i in range(cfg.num_layers):
        wq, wk = params["wq"][i].T, params["wk"][i].T  # (out, in)
        if permute:
            wq, wk = permute_qk(wq, cfg.num_heads), permute_qk(wk, cfg.num_kv_heads)
        w.add_tensor(f"blk.{i}.attn_norm.weight", params["attn_norm"][i])
        w.add_tensor(f"blk.{i}.attn_q.weight", np.ascontiguousarray(wq))
        w.add_tensor(f"blk.{i}.attn_k.weight", np.ascontiguousarray(wk))
        lin(f"blk.{i}.attn_v.weight", params["wv"][i])
        lin(f"blk.{i}.attn_output.weight", params["wo"][i])
        if "bq" in params:
            bq, bk = params["bq"][i], params["bk"][i]
            if permute:
                bq, bk = permute_qk(bq, cfg.num_heads), permute_qk(bk, cfg.num_kv_heads)
            w.add_tensor(f"blk.{i}.attn_q.bias", np.ascontiguousarray(bq))
            w.add_tensor(f"blk.{i}.attn_k.bias", np.ascontiguousarray(bk))
            w.add_tensor(f"blk.{i}.attn_v.bias", params["bv"][i])
        if "q_norm" in params:
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", params["q_norm"][i])
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", params["k_norm"][i])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", params["mlp_norm"][i])
        lin(f"blk.{i}.ffn_gate.weight", params["w_gate"][i])
        lin(f"blk.{i}.ffn_up.weight", params["w_up"][i])
        lin(f"blk.{i}.ffn_down.weight", params["w_down"][i])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
