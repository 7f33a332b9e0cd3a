"""Model configuration shared by the loaders, the model and the engine.

One frozen dataclass describes every supported Llama-family architecture; the differences
between Llama, Mistral, Qwen2 and Qwen3 are switches (``attention_bias``, ``qk_norm``,
``rope_scaling``, ``tie_word_embeddings``) rather than separate classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokencake.models.generation import checked

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")

# HF ``architectures`` entry -> our arch name.
_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# HF ``model_type`` -> our arch name (used when ``architectures`` is absent).
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder.

    ``rope_scaling`` is a Hugging Face style dict (``{"rope_type": "llama3", "factor": ...}``) or
    ``None``. ``eos_token_ids`` lists every token that ends a generation.
    ``sampling_defaults`` holds the sampling settings the model's files recommend
    (``temperature`` / ``top_p`` / ``top_k``; see :mod:`tokencake.models.generation`).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""
    sampling_defaults: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"arch: unsupported architecture {self.arch!r} (supported: {SUPPORTED_ARCHS})"
            )
        for f in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "max_position_embeddings",
        ):  # fmt: skip
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f}: must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            # RoPE rotates pairs of channels.
            raise ValueError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta: must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps: must be positive, got {self.rms_norm_eps!r}")
        # Normalise containers so equality/hashing behave (json gives lists, HF gives ints).
        eos = self.eos_token_ids
        eos = (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
        for e in eos:
            if not 0 <= e < self.vocab_size:
                raise ValueError(f"eos_token_ids: id {e} outside vocabulary [0, {self.vocab_size})")
        object.__setattr__(self, "eos_token_ids", eos)
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id: id {self.bos_token_id} outside vocabulary")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        unknown = sorted(set(self.sampling_defaults) - {"temperature", "top_p", "top_k"})
        if unknown:
            raise ValueError(f"sampling_defaults: unknown key {unknown[0]!r}")
        object.__setattr__(
            self, "sampling_defaults", checked(dict(self.sampling_defaults), "sampling_defaults")
        )

    def __hash__(self) -> int:
        # The dict field makes the generated hash fail; hash the json-able form instead.
        return hash(tuple(sorted((k, repr(v)) for k, v in self.to_dict().items())))

    @property
    def q_size(self) -> int:
        """Width of the concatenated query heads (``num_heads * head_dim``)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the concatenated key (or value) heads (``num_kv_heads * head_dim``)."""
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (re-validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error (catches stale files)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict.

        Supports ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
        ``Qwen3ForCausalLM``; anything else raises ``ValueError`` naming the architecture.
        """
        archs = hf.get("architectures") or []
        arch = None
        for a in archs:
            if a in _HF_ARCHS:
                arch = _HF_ARCHS[a]
                break
        if arch is None and not archs:
            arch = _HF_MODEL_TYPES.get(hf.get("model_type", ""))
        if arch is None:
            what = archs or hf.get("model_type")
            raise ValueError(
                f"unsupported model architecture {what!r} (supported: {sorted(_HF_ARCHS)})"
            )
        # Newer transformers configs may nest text settings; accept both.
        if "text_config" in hf and "hidden_size" not in hf:
            hf = {**hf, **hf["text_config"]}
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            layers = int(hf["num_hidden_layers"])
            vocab = int(hf["vocab_size"])
            ffn = int(hf["intermediate_size"])
        except KeyError as e:
            raise ValueError(f"config.json is missing required key {e.args[0]!r}") from None
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or hidden // heads)
        rope_scaling = hf.get("rope_scaling")
        # transformers 5 moves theta (and scaling) into ``rope_parameters``.
        rope_params = hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            None,
            "default",
        ):
            rope_scaling = None
        eos = hf.get("eos_token_id")
        eos_ids: tuple[int, ...] = (
            () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        )
        if arch == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v biases; HF has no flag for it.
        else:
            attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            attention_bias=attention_bias,
            qk_norm=arch == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name or hf.get("_name_or_path", "") or "",
        )


def _validate_rope_scaling(rs: dict[str, Any]) -> None:
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling: must be a dict or None, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling: unsupported type {kind!r} (supported: {_ROPE_TYPES})")
    if kind in ("linear", "llama3") and not float(rs.get("factor", 0)) > 0:
        raise ValueError(f"rope_scaling: {kind} scaling needs a positive 'factor'")
    if kind == "llama3" and "original_max_position_embeddings" not in rs:
        raise ValueError("rope_scaling: llama3 scaling needs 'original_max_position_embeddings'")


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-weights Llama config for tests; ``overrides`` replace any field."""
    base: dict[str, Any] = dict(
        arch="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        attention_bias=False,
        qk_norm=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="tiny-llama",
    )
    base.update(overrides)
    return ModelConfig(**base)
