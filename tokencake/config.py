"""Engine configuration: one frozen, validated object for every knob a user can turn.

It is the head of the config chain: :meth:`EngineConfig.scheduler_config` and
:meth:`EngineConfig.runner_config` build the scheduler's and the runner's configs from the
fields they share (validated once, where they are defined), and ``tokencake`` carries the
agent-aware policies' settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokencake.scheduler.config import SchedulerConfig
from tokencake.scheduler.policies import policy_names
from tokencake.scheduler.tokencake_config import TokencakeConfig

if TYPE_CHECKING:
    from tokencake.runner_config import RunnerConfig


def check_weight_dtype(weight_dtype: str | None, dtype: str) -> None:
    """ValueError unless ``weight_dtype`` is None, ``dtype`` itself, or bfloat16 weights
    under float32 compute."""
    if weight_dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"weight_dtype must be float32 or bfloat16, got {weight_dtype!r}")
    if weight_dtype == "float32" and dtype == "bfloat16":
        raise ValueError("weight_dtype float32 needs dtype float32 (weights wider than compute)")


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. ``num_pages`` wins over ``kv_cache_gib`` when both are given.

    ``max_num_batched_tokens`` is the per-step token budget (chunked prefill);
    ``max_prefill_seqs`` bounds how many prompt chunks share one step. ``policy`` is any
    registered policy name (``tokencake.scheduler.policies.policy_names()``); ``tokencake``
    (a :class:`TokencakeConfig` or its ``from_dict`` form) tunes the agent-aware policies.
    ``overlap`` plans and dispatches each step while the one before still runs on the
    device (``tokencake/overlap.py``; same greedy outputs; one device, for now): ``None``
    (the default) turns it on wherever it is supported, that is without tensor parallelism
    and without ``distributed``; ``True`` there is an error.
    ``fused_steps`` runs a step's prefill chunk and its decode rows as one device call (one
    weight read; attention still per group at each group's own shape) when the pair of shapes
    is in a small family compiled at warm-up (``StepBuckets.fused_shapes``), as two calls
    otherwise; same greedy outputs; one device, for now: ``None`` (the default) turns it on
    on a CPU without tensor parallelism or ``distributed``
    (``RunnerConfig.resolved_fused_steps``).
    ``weight_dtype`` (None: ``dtype``) stores the matrices, embedding and LM head in that
    dtype; ``"bfloat16"`` under float32 compute rounds each dot's input to bfloat16 and sums in
    float32 (``models/llama.py`` ``project``): faster prefill and batched decode on a CPU with
    AVX512_BF16, outputs close to float32's but not equal (``bench/RESULTS.md`` §7).
    """

    model: str | None = None
    dtype: str = "float32"
    weight_dtype: str | None = None
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
    tokencake: TokencakeConfig | dict[str, Any] | None = None
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    distributed: bool = False  # call jax.distributed.initialize() (multi-host SPMD)
    warmup: bool = True
    seed: int = 0
    overlap: bool | None = None
    fused_steps: bool | None = None
    bucket_pages: bool | None = None  # see RunnerConfig.resolved_bucket_pages

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        check_weight_dtype(self.weight_dtype, self.dtype)
        self.scheduler_config()  # validates the batch limits and the preemption mode
        for name in ("page_size", "tensor_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {self.num_pages}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.host_kv_gib < 0:
            raise ValueError(f"host_kv_gib must be >= 0, got {self.host_kv_gib}")
        if self.policy not in policy_names():
            raise ValueError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(policy_names())}"
            )
        if not isinstance(self.tokencake, TokencakeConfig):
            if self.tokencake is not None and not isinstance(self.tokencake, dict):
                raise TypeError("tokencake must be a TokencakeConfig, a dict or None")
            # frozen: normalise once, so every reader sees a TokencakeConfig
            object.__setattr__(self, "tokencake", TokencakeConfig.from_dict(self.tokencake))
        multi_device = self.tensor_parallel_size > 1 or self.distributed
        if self.overlap is None:
            # frozen: resolve the default once, so every reader sees a bool
            object.__setattr__(self, "overlap", not multi_device)
        elif self.overlap and multi_device:
            raise ValueError(
                "overlap is not supported with tensor_parallel_size > 1 or distributed yet"
            )
        if self.fused_steps is None and multi_device:
            object.__setattr__(self, "fused_steps", False)  # frozen: resolved once, as overlap
        elif self.fused_steps and multi_device:
            raise ValueError(
                "fused_steps is not supported with tensor_parallel_size > 1 or distributed yet"
            )
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError("max_prefill_chunk cannot exceed max_num_batched_tokens")

    def scheduler_config(self, max_model_len: int | None = None) -> SchedulerConfig:
        """The scheduler's config: the shared fields, ``max_model_len`` capped by the model."""
        return _shared(self, SchedulerConfig, max_model_len=max_model_len or self.max_model_len)

    def runner_config(self, num_pages: int, max_model_len: int) -> RunnerConfig:
        """The runner's config for a pool of ``num_pages`` pages (sized from the model)."""
        from tokencake.runner_config import RunnerConfig

        return _shared(self, RunnerConfig, num_pages=num_pages, max_model_len=max_model_len)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from keyword arguments, naming any unknown key in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)


def _shared(cfg: EngineConfig, cls: type, **given: Any) -> Any:
    """Build ``cls`` (a dataclass config) from ``given`` plus every field it shares by name
    with ``cfg``: one rule instead of copying fields one by one."""
    names = {f.name for f in dataclasses.fields(cls)}
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    return cls(**{**shared, **given})
