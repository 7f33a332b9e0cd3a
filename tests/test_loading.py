"""Model config, canonical weights, GGUF / HF / orbax loaders and model resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import hf_config_dict, write_gguf, write_hf_checkpoint

from tokencake.models.checkpoint import convert, load_orbax, save_orbax
from tokencake.models.config import ModelConfig, tiny_config
from tokencake.models.gguf_loader import load_gguf
from tokencake.models.hf_loader import _read_bf16_as_f32, load_hf_folder
from tokencake.models.hub import resolve_model
from tokencake.models.tokenizer import Tokenizer
from tokencake.models.weights import (
    expected_shapes,
    param_count,
    permute_qk,
    random_params,
    unpermute_qk,
    validate_params,
)

VARIANTS = {
    "llama-tied": {},
    "llama-untied": dict(tie_word_embeddings=False),
    "qwen2": dict(arch="qwen2", attention_bias=True, tie_word_embeddings=False, rope_theta=1e6),
    "qwen3": dict(arch="qwen3", qk_norm=True, eos_token_ids=(2, 5)),
}


def assert_params_equal(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 0.0
) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert b[k].dtype == np.float32, k
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


# --------------------------------------------------------------------------- config


def test_tiny_config_values_and_round_trip():
    cfg = tiny_config()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        256,
        64,
        128,
        2,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    assert hash(ModelConfig.from_dict(d)) == hash(cfg)
    scaled = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}, num_layers=3)
    assert ModelConfig.from_dict(json.loads(json.dumps(scaled.to_dict()))) == scaled


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_kv_heads=3), "num_heads"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(head_dim=15), "head_dim"),
        (dict(arch="gpt2"), "arch"),
        (dict(eos_token_ids=(999,)), "eos_token_ids"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    ],
)
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_from_hf_config_architectures():
    for name, over in VARIANTS.items():
        cfg = tiny_config(**over)
        got = ModelConfig.from_hf_config(hf_config_dict(cfg), name=cfg.name)
        assert got == cfg, name
    llama3 = {
        **hf_config_dict(tiny_config()),
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert ModelConfig.from_hf_config(llama3).rope_scaling["factor"] == 8.0
    # transformers 5 style: theta and scaling live in rope_parameters.
    v5 = {
        **hf_config_dict(tiny_config()),
        "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
    }
    v5.pop("rope_theta")
    v5.pop("rope_scaling")
    v5_cfg = ModelConfig.from_hf_config(v5)
    assert v5_cfg.rope_theta == 5e5 and v5_cfg.rope_scaling == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    # Qwen2 always has q/k/v biases even though its config.json has no flag for it.
    qwen2 = {**hf_config_dict(tiny_config()), "architectures": ["Qwen2ForCausalLM"]}
    qwen2.pop("attention_bias")
    assert ModelConfig.from_hf_config(qwen2).attention_bias
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_config(
            {**hf_config_dict(tiny_config()), "architectures": ["GPT2LMHeadModel"]}
        )


# --------------------------------------------------------------------------- weights


def test_expected_shapes_and_random_params():
    for over in VARIANTS.values():
        cfg = tiny_config(**over)
        p = random_params(cfg, seed=3)
        validate_params(cfg, p)
        assert {k: v.shape for k, v in p.items()} == expected_shapes(cfg)
        assert ("lm_head" in p) == (not cfg.tie_word_embeddings)
        assert ("bq" in p) == cfg.attention_bias and ("q_norm" in p) == cfg.qk_norm
        assert np.all(p["attn_norm"] == 1) and np.all(p["final_norm"] == 1)
        assert 0.015 < p["wq"].std() < 0.025
    cfg = tiny_config()
    assert_params_equal(random_params(cfg, 7), random_params(cfg, 7))
    assert not np.array_equal(random_params(cfg, 7)["wq"], random_params(cfg, 8)["wq"])
    assert param_count(random_params(cfg)) == sum(
        int(np.prod(s)) for s in expected_shapes(cfg).values()
    )


def test_validate_params_errors():
    cfg = tiny_config()
    p = random_params(cfg)
    missing = {k: v for k, v in p.items() if k != "wk"}
    with pytest.raises(ValueError, match="'wk'"):
        validate_params(cfg, missing)
    bad = {**p, "w_up": p["w_up"][:, :, :-1]}
    with pytest.raises(ValueError, match="'w_up'.*expected"):
        validate_params(cfg, bad)
    with pytest.raises(ValueError, match="lm_head"):
        validate_params(cfg, {**p, "lm_head": np.zeros((64, 256), np.float32)})
    with pytest.raises(ValueError, match="lm_head"):
        validate_params(tiny_config(tie_word_embeddings=False), p)


def _rope_half(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None, None] * inv
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate(
        [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1
    )


def _rope_interleaved(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None, None] * inv
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * np.cos(ang) - xo * np.sin(ang)
    out[..., 1::2] = xo * np.cos(ang) + xe * np.sin(ang)
    return out


@pytest.mark.parametrize(("n_heads", "hd"), [(9, 64), (3, 64), (4, 16), (1, 8)])
def test_unpermute_inverts_gguf_permute(n_heads, hd):
    rng = np.random.default_rng(0)
    w_hf = rng.standard_normal((n_heads * hd, 24))
    w_gguf = permute_qk(w_hf, n_heads)
    assert not np.array_equal(w_gguf, w_hf)
    np.testing.assert_array_equal(unpermute_qk(w_gguf, n_heads), w_hf)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w_hf, n_heads), n_heads), w_hf)
    b = rng.standard_normal(n_heads * hd)  # biases permute the same way
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, n_heads), n_heads), b)
    # The meaning of the permutation: interleaved RoPE on GGUF rows == rotate_half RoPE on HF rows.
    x = rng.standard_normal((5, 24))
    pos = np.arange(5) * 7.0
    q_hf = (x @ w_hf.T).reshape(5, n_heads, hd)
    q_gguf = (x @ w_gguf.T).reshape(5, n_heads, hd)
    rot_gguf = _rope_interleaved(q_gguf, pos, 1e4).reshape(5, -1)
    back = unpermute_qk(rot_gguf.T, n_heads).T.reshape(5, n_heads, hd)
    np.testing.assert_allclose(back, _rope_half(q_hf, pos, 1e4), atol=1e-10)
    # Without the un-permute the rotation is wrong.
    assert not np.allclose(_rope_half(q_gguf, pos, 1e4).reshape(5, -1), rot_gguf)


# --------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_folder_loader(tmp_path, variant):
    cfg = tiny_config(name="tiny-hf", **VARIANTS[variant])
    params = random_params(cfg, seed=11)
    write_hf_checkpoint(tmp_path / "tiny-hf", cfg, params)
    got_cfg, got = load_hf_folder(tmp_path / "tiny-hf")
    assert got_cfg == cfg
    assert_params_equal(params, got)


def test_hf_folder_sharded_bf16(tmp_path):
    import ml_dtypes

    cfg = tiny_config(tie_word_embeddings=False, name="sharded")
    params = random_params(cfg, seed=2)
    write_hf_checkpoint(tmp_path / "sharded", cfg, params, dtype="bfloat16", shards=3)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) == 3
    got_cfg, got = load_hf_folder(tmp_path / "sharded")
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params.items()}
    assert_params_equal(rounded, got)
    # The torch-free raw-bytes bf16 path gives the same values as ml_dtypes.
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[0]
    raw = _read_bf16_as_f32(shard)
    assert raw and all(v.dtype == np.float32 for v in raw.values())
    from tokencake.models.hf_loader import read_safetensors

    via = read_safetensors(shard)
    for k, v in raw.items():
        np.testing.assert_array_equal(v, via[k])


def test_hf_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(tmp_path)
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_folder(tmp_path)
    write_hf_checkpoint(tmp_path / "m", cfg, random_params(cfg))
    bad = {**hf_config_dict(cfg), "architectures": ["FalconForCausalLM"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_hf_folder(tmp_path / "m")


# --------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("variant", ["llama-tied", "llama-untied", "qwen2", "qwen3"])
def test_gguf_loader_synthetic(tmp_path, variant):
    cfg = tiny_config(name="tiny", **VARIANTS[variant])
    params = random_params(cfg, seed=5)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, params, Tokenizer.byte_level_for_tests())
    got_cfg, got = load_gguf(path)
    assert got_cfg.replace(eos_token_ids=cfg.eos_token_ids) == cfg
    assert_params_equal(params, got)


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ValueError, match="junk.gguf"):
        load_gguf(junk)
    cfg = tiny_config()
    good = write_gguf(
        tmp_path / "t.gguf", cfg, random_params(cfg), Tokenizer.byte_level_for_tests()
    )
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="trunc.gguf"):
        load_gguf(trunc)


def test_default_gguf_config(default_model):
    cfg, params, tok, name = default_model
    assert name == "SmolLM2-135M-Instruct"
    assert cfg.arch == "llama"
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and "lm_head" not in params
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5 and cfg.rope_scaling is None
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert cfg.max_position_embeddings == 8192
    validate_params(cfg, params)
    assert param_count(params) == 134_515_008
    assert all(v.dtype == np.float32 for v in params.values())
    assert tok.eos_token_ids == (2,)


# --------------------------------------------------------------------------- orbax / resolve


def test_orbax_round_trip(tmp_path):
    cfg = tiny_config(arch="qwen3", qk_norm=True, tie_word_embeddings=False, name="tiny-q3")
    params = random_params(cfg, seed=9)
    tok = Tokenizer.byte_level_for_tests()
    out = save_orbax(cfg, params, tok, tmp_path / "ck", progress=False)
    got_cfg, got, got_tok = load_orbax(out)
    assert got_cfg == cfg
    assert_params_equal(params, got)
    msgs = [{"role": "user", "content": "héllo 🌍"}]
    assert got_tok.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    assert got_tok.eos_token_ids == tok.eos_token_ids
    r_cfg, r_params, _, name = resolve_model(out)
    assert r_cfg == cfg and name == "tiny-q3"
    with pytest.raises(FileExistsError):
        save_orbax(cfg, params, tok, out, progress=False)
    save_orbax(cfg, params, tok, out, progress=False, overwrite=True)


def test_convert_gguf_and_resolve(tmp_path, capsys):
    cfg = tiny_config()
    params = random_params(cfg, seed=4)
    tok = Tokenizer.byte_level_for_tests()
    src = write_gguf(tmp_path / "tiny-chat.gguf", cfg, params, tok)
    dst = convert(src, tmp_path / "converted", progress=True)
    assert "converting" in capsys.readouterr().err
    g_cfg, g_params, g_tok, g_name = resolve_model(src)
    o_cfg, o_params, o_tok, o_name = resolve_model(dst)
    assert g_name == o_name == "tiny-chat"
    assert g_cfg == o_cfg
    assert_params_equal(g_params, o_params)
    text = "x = 1 ✓ 漢字"
    assert g_tok.encode(text) == o_tok.encode(text) == tok.encode(text)
    # A HF folder resolves too (tokenizer saved alongside).
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, params, tokenizer=tok)
    h_cfg, h_params, h_tok, h_name = resolve_model(hf)
    assert h_name == "hf" and h_tok.encode(text) == tok.encode(text)
    assert_params_equal(params, h_params)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a model folder"):
        resolve_model(tmp_path)
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(txt)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "tokencake_checkpoint.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="version"):
        resolve_model(tmp_path / "ck")


def test_convert_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert(Path(tmp_path / "none.gguf"), tmp_path / "out", progress=False)
