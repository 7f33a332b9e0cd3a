"""Per-policy counters for comparing policies on the same workload.

``effective_kv_utilization`` is the time-averaged fraction of device blocks that hold KV of
running (admitted) requests: blocks idle behind a tool call, cached or free do not count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tokencake.scheduler.plan import StepPlan
from tokencake.scheduler.request import Request

if TYPE_CHECKING:
    from tokencake.scheduler.core import Scheduler


@dataclass
class PolicyMetrics:
    policy: str = ""
    steps: int = 0
    sim_time_s: float = 0.0
    finished: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    copy_bytes_d2h: int = 0
    copy_bytes_h2d: int = 0
    stalled_kv_block_s: float = 0.0  # device blocks pinned for tool-waiting agents x seconds
    _util_integral: float = 0.0

    @property
    def effective_kv_utilization(self) -> float:
        return self._util_integral / self.sim_time_s if self.sim_time_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_util_integral")
        d["effective_kv_utilization"] = self.effective_kv_utilization
        return d


class MetricsCollector:
    """Observe a scheduler step by step (call :meth:`observe` after each executed step)."""

    def __init__(self, policy: str, bytes_per_block: int) -> None:
        self.m = PolicyMetrics(policy)
        self.bytes_per_block = bytes_per_block

    def observe(self, scheduler: Scheduler, plan: StepPlan, dt: float) -> None:
        m = self.m
        m.steps += 1
        m.sim_time_s += dt
        held = set()
        for r in scheduler.running:
            held.update(r.block_ids)
        m._util_integral += dt * len(held) / max(1, scheduler.pool.capacity)
        for c in plan.copies:
            n = len(c.device_blocks) * self.bytes_per_block
            if c.direction == "d2h":
                m.copy_bytes_d2h += n
            else:
                m.copy_bytes_h2d += n
        ts = scheduler.policy.time_scheduler_stats()
        if ts is not None:
            m.stalled_kv_block_s += dt * ts.stalled_blocks
        m.preemptions = scheduler.num_preemptions

    def on_finished(self, req: Request) -> None:
        self.m.finished += 1
        self.m.recomputed_tokens += req.num_recomputed_tokens
        self.m.device_hit_tokens += req.num_cached_tokens
