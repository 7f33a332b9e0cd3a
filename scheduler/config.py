"""The scheduler core's configuration: batch limits and the default preemption mode."""

from __future__ import annotations

from dataclasses import dataclass, fields

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits. ``max_num_batched_tokens`` bounds tokens per step (the prefill chunk
    budget); ``max_prefill_chunk`` bounds one request's chunk; ``max_prefill_seqs`` bounds how
    many prompt chunks share one step; ``max_model_len`` bounds a sequence (prompt + output).

    ``preemption_mode``: "swap" copies a preempted request's full blocks to the host tier
    (needs a host pool; falls back to recompute when it is full); a policy may override it
    per victim (``Policy.preemption_mode``)."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 512
    max_prefill_seqs: int = 4
    max_model_len: int = 2048
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "preemption_mode" and (
                not isinstance(v, int) or isinstance(v, bool) or v < 1
            ):
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
