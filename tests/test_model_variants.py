"""The Flax decoder over the paged KV against an independent dense numpy forward, for every
architecture switch (Llama 3 RoPE scaling, Qwen2 q/k/v bias, Qwen3 q/k norm, untied head)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import lively_params
from tests.helpers.compiles import recorded_compiles
from tests.test_engine import PROMPTS, run_batch, run_solo
from tokencake.config import EngineConfig
from tokencake.diagnostics import prompt_logits
from tokencake.models.config import tiny_config
from tokencake.models.host_arena import HUGE_PAGE, HostArena
from tokencake.models.llama import LAYER_LOOPS, MATRIX_KEYS
from tokencake.runner import ModelRunner
from tokencake.runner_config import RunnerConfig

VARIANTS = {
    "llama": {},
    "llama3-rope": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),  # fmt: skip
    "qwen2-bias": dict(arch="qwen2", attention_bias=True, tie_word_embeddings=False),
    "qwen3-qknorm": dict(arch="qwen3", qk_norm=True),
    "mha-untied": dict(num_kv_heads=4, tie_word_embeddings=False),
}


def dense_forward(cfg, p, ids, dot_in=lambda a: a):
    """Textbook HF-style Llama forward in float64 numpy (no paging, no JAX). ``dot_in`` maps
    every matrix product's activation operand (to model a dot that rounds its input)."""
    x = p["embed"][ids].astype(np.float64)
    t, hq, hkv, d = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def norm(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + cfg.rms_norm_eps) * w

    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    sc = cfg.rope_scaling
    if sc:  # Llama 3 frequency smoothing, written out independently of models/rope.py
        lo_w, hi_w = (
            sc["original_max_position_embeddings"] / sc["low_freq_factor"],
            sc["original_max_position_embeddings"] / sc["high_freq_factor"],
        )
        new = []
        for f in inv:
            w = 2 * np.pi / f
            if w < hi_w:
                new.append(f)
            elif w > lo_w:
                new.append(f / sc["factor"])
            else:
                s = (sc["original_max_position_embeddings"] / w - sc["low_freq_factor"]) / (
                    sc["high_freq_factor"] - sc["low_freq_factor"]
                )
                new.append((1 - s) * f / sc["factor"] + s * f)
        inv = np.array(new)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(v):
        a, b = v[..., : d // 2], v[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    for layer in range(cfg.num_layers):

        def w(k, layer=layer):
            return p[k][layer].astype(np.float64)

        h = norm(x, w("attn_norm"))
        h = dot_in(h)
        q, k, v = h @ w("wq"), h @ w("wk"), h @ w("wv")
        if cfg.attention_bias:
            q, k, v = q + w("bq"), k + w("bk"), v + w("bv")
        q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
        if cfg.qk_norm:
            q, k = norm(q, w("q_norm")), norm(k, w("k_norm"))
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, hq // hkv, 1), np.repeat(v, hq // hkv, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        x = x + dot_in(np.einsum("hqk,khd->qhd", pr, v).reshape(t, hq * d)) @ w("wo")
        h = dot_in(norm(x, w("mlp_norm")))
        g = h @ w("w_gate")
        x = x + dot_in(g / (1 + np.exp(-g)) * (h @ w("w_up"))) @ w("w_down")
    x = dot_in(norm(x, p["final_norm"]))
    head = p["lm_head"] if "lm_head" in p else p["embed"].T
    return x @ head


def variant_runner(cfg, params, layer_loop="auto", **overrides) -> ModelRunner:
    opts = dict(num_pages=16, page_size=8, max_model_len=128, max_num_seqs=1,
                max_prefill_chunk=64, max_prefill_seqs=1, layer_loop=layer_loop)  # fmt: skip
    return ModelRunner(cfg, params, RunnerConfig(**{**opts, **overrides}))


def scaled_params(cfg):
    params = lively_params(cfg, seed=3)
    return {
        k: v * 0.25 if k not in ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm") else v
        for k, v in params.items()
    }


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoder_matches_dense_reference(name):
    cfg = tiny_config(**VARIANTS[name])
    params = scaled_params(cfg)
    ids = np.random.default_rng(1).integers(8, cfg.vocab_size, 37).tolist()
    runner = variant_runner(cfg, params)
    # Scrambled, non-contiguous pages: the paged layout must not matter.
    ours = prompt_logits(runner, ids, [9, 3, 14, 1, 7])
    ref = dense_forward(cfg, params, ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(("fuse", "transpose"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("loop", LAYER_LOOPS)
@pytest.mark.parametrize("name", ["qwen2-bias", "qwen3-qknorm"])
def test_every_layer_loop_matches_dense_reference(loop, name, fuse, transpose):
    # Biases and q/k norms are per-layer vectors indexed inside the loop; an off-by-one
    # layer index in any loop would pair one layer's matrices with another's vectors. With
    # fused projections, a wrong split of q/k/v or gate/up would mix heads or halves; with
    # [out, in] storage, a contraction over the wrong axis of a (square) matrix would
    # multiply by its transpose; the untied head (qwen2-bias) is stored transposed too.
    cfg = tiny_config(num_layers=3, **VARIANTS[name])
    params = scaled_params(cfg)
    ids = np.random.default_rng(2).integers(8, cfg.vocab_size, 21).tolist()
    runner = variant_runner(cfg, params, loop, fuse_projections=fuse, transpose_weights=transpose)
    model = runner.model(runner.state)
    assert model.fused is fuse and model.transposed is transpose
    ours = prompt_logits(runner, ids, [5, 2, 11])
    np.testing.assert_allclose(ours, dense_forward(cfg, params, ids), atol=2e-4, rtol=2e-4)


def test_switch_loop_reads_weights_in_place():
    """The CPU layer loop must not copy weight matrices out of a stack before its dots (the
    scan over stacked weights did: a dynamic-slice fusion per matrix per layer per step)."""
    cfg = tiny_config(num_layers=3, hidden_size=64, intermediate_size=192)
    params = scaled_params(cfg)

    def weight_copies(loop: str) -> int:
        runner = variant_runner(cfg, params, loop)
        hlo = runner.compiled((1, 1, 8)).as_text()
        # every matrix shape, unfused (q, k/v, gate/up, down) and fused (qkv, gate_up),
        # stored [in, out] or [out, in]
        mats = ((64, 64), (64, 32), (64, 192), (192, 64), (64, 128), (64, 384))
        shapes = {f"f32[{a},{b}]" for m in mats for a, b in (m, m[::-1])}
        return sum(
            1
            for line in hlo.splitlines()
            if "dynamic-slice" in line
            and " = " in line
            and line.split(" = ")[1].split("{")[0] in shapes
        )

    assert weight_copies("scan") > 0  # the check sees the copies the scan makes
    assert weight_copies("switch") == 0


def test_weights_are_stored_out_in_by_default_on_cpu_only():
    assert RunnerConfig(num_pages=4).resolved_transpose_weights("cpu") is True
    assert RunnerConfig(num_pages=4).resolved_transpose_weights("gpu") is False
    assert (
        RunnerConfig(num_pages=4, transpose_weights=False).resolved_transpose_weights("cpu")
        is False
    )


def bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (ml_dtypes, round to nearest even), back in float64."""
    return np.asarray(a, ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize(
    ("loop", "fuse", "transpose"), [("switch", True, True), ("scan", False, False)]
)
@pytest.mark.parametrize("name", ["llama", "qwen2-bias"])
def test_bfloat16_weights_match_a_dense_reference_that_rounds_alike(name, loop, fuse, transpose):
    """``weight_dtype="bfloat16"``: the matrices, embedding and head stored bfloat16, each dot's
    input rounded to bfloat16 and summed in float32. The float64 reference rounds the same
    operands and nothing else. A one-token prompt (one-row dots, padded to two) matches it to
    float32 precision; over a longer prompt an activation that float32 and float64 put on
    either side of a bfloat16 rounding boundary moves that element by 2^-8, so there the
    mean error is compared: a fifth of the distance to the float32 reference, or less."""
    cfg = tiny_config(num_layers=3, **VARIANTS[name])
    params = scaled_params(cfg)
    rounded = {
        k: bf16(v) if k in (*MATRIX_KEYS, "embed", "lm_head") else v for k, v in params.items()
    }
    runner = variant_runner(cfg, params, loop, weight_dtype="bfloat16", fuse_projections=fuse,
                            transpose_weights=transpose)  # fmt: skip
    model = runner.model(runner.state)
    assert model.weight_dtype == np.dtype(ml_dtypes.bfloat16) and model.dtype == np.float32
    for n in (1, 23):
        ids = np.random.default_rng(n).integers(8, cfg.vocab_size, n).tolist()
        ours = prompt_logits(runner, ids, [5, 2, 11])
        assert ours.dtype == np.float32
        err = np.abs(ours - dense_forward(cfg, rounded, ids, dot_in=bf16))
        err_f32 = np.abs(ours - dense_forward(cfg, params, ids))
        if n == 1:
            assert err.max() < 1e-6 < 1e-3 < err_f32.max()
        else:
            assert err.mean() < 0.2 * err_f32.mean() and err.max() < 5e-3


def test_bfloat16_weights_serve_without_compiling_after_warmup(make_engine):
    engine = make_engine(warmup=True, weight_dtype="bfloat16")
    assert engine.runner.model(engine.runner.state).weight_dtype == np.dtype(ml_dtypes.bfloat16)
    with recorded_compiles() as compiles:
        batched = run_batch(engine, PROMPTS)
    assert compiles == [], f"compiled after warm-up: {compiles}"
    # A row's tokens do not depend on its batch (one-row steps pad their dots to two rows).
    assert batched == run_solo(engine, PROMPTS)


def test_weight_dtype_is_checked():
    with pytest.raises(ValueError, match="weight_dtype must be"):
        EngineConfig(weight_dtype="int8")
    with pytest.raises(ValueError, match="wider than compute"):
        RunnerConfig(num_pages=4, dtype="bfloat16", weight_dtype="float32")
    assert EngineConfig(weight_dtype="bfloat16").runner_config(8, 64).weight_dtype == "bfloat16"
    from tokencake.cli import build_parser, engine_config_from_args

    def parsed(*flags: str) -> str | None:
        return engine_config_from_args(build_parser().parse_args(["serve", *flags])).weight_dtype

    assert parsed() is None and parsed("--weight-dtype", "bfloat16") == "bfloat16"


def test_unknown_layer_loop_is_refused():
    with pytest.raises(ValueError, match="layer_loop"):
        RunnerConfig(num_pages=4, layer_loop="while")


@pytest.mark.parametrize("weight_dtype", [None, "bfloat16"])
def test_packed_weights_alias_one_buffer_and_match(weight_dtype):
    """``pack_weights`` puts the matrices back to back in one huge-page host buffer that the
    device arrays alias (no copy), in read order, and changes no logits."""
    cfg = tiny_config(num_layers=3, **VARIANTS["qwen2-bias"])
    params = scaled_params(cfg)
    ids = np.random.default_rng(4).integers(8, cfg.vocab_size, 19).tolist()
    packed = variant_runner(cfg, params, "switch", pack_weights=True, weight_dtype=weight_dtype)
    model = packed.model(packed.state)
    assert model.matrices[0]["wo"][...].dtype == model.weight_dtype
    ptrs = [
        model.matrices[i][k][...].unsafe_buffer_pointer()
        for i in range(3)
        for k in model.matrix_keys
    ]
    ptrs.append(model.lm_head[...].unsafe_buffer_pointer())
    assert ptrs == sorted(ptrs) and ptrs[0] % HUGE_PAGE == 0
    assert ptrs[-1] - ptrs[0] < HostArena.size_of(list(params.values()), np.float32)
    plain = variant_runner(cfg, params, "switch", weight_dtype=weight_dtype)
    np.testing.assert_array_equal(
        prompt_logits(packed, ids, [3, 6, 1]), prompt_logits(plain, ids, [3, 6, 1])
    )
