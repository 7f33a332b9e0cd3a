"""Engine configuration: one frozen, validated object for every knob a user can turn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POLICIES = ("vllm", "tokencake", "tokencake-space", "tokencake-time", "tokencake-fcfs", "infercept",
            "continuum")  # fmt: skip


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. ``num_pages`` wins over ``kv_cache_gib`` when both are given.

    ``max_num_batched_tokens`` is the per-step token budget (chunked prefill);
    ``max_prefill_seqs`` bounds how many prompt chunks share one step.
    """

    model: str | None = None
    dtype: str = "float32"
    page_size: int = 16
    kv_cache_gib: float = 0.25
    num_pages: int | None = None
    host_kv_gib: float = 0.0
    preemption_mode: str = "recompute"
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 512
    max_prefill_seqs: int = 4
    enable_prefix_cache: bool = True
    policy: str = "vllm"
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    distributed: bool = False  # call jax.distributed.initialize() (multi-host SPMD)
    warmup: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("page_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "max_prefill_chunk", "max_prefill_seqs", "tensor_parallel_size"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {self.num_pages}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.host_kv_gib < 0:
            raise ValueError(f"host_kv_gib must be >= 0, got {self.host_kv_gib}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError("max_prefill_chunk cannot exceed max_num_batched_tokens")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from keyword arguments, naming any unknown key in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)
