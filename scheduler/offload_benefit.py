"""The Time Scheduler's offload test: the paper's waiting-queue pressure forecast (§5.4) and
its benefit function (§5.6), term for term. Pure functions of a pool, a queue and one tool
call's facts; ``time_sched.py`` decides with them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.request import Request
from tokencake.scheduler.tokencake_config import TimeConfig


class Reason(enum.Enum):
    """Outcome of the benefit cascade (§5.6) plus the evaluation-pass outcomes (§5.5)."""

    NOT_ELIGIBLE = "not_eligible"
    EMPTY = "empty"
    NO_WAITING_DEMAND = "no_waiting_demand"
    CPU_CAPACITY = "cpu_capacity"
    UNPROFITABLE = "unprofitable"
    LOW_PRESSURE = "low_pressure"
    SELECTED = "selected"
    BACKOFF = "backoff"


@dataclass(frozen=True)
class Pressure:
    """Read-only forecast of who could be admitted now and overwrite free cached blocks."""

    usage: float
    free: int
    waiting_count: int
    waiting_demand: int
    critical_demand: int
    shared_available: int
    fit_demand: int
    uncommitted: int = 0  # ours: free minus admitted requests' remaining growth and restores


def waiting_pressure(
    pool: BlockPool,
    waiting: Sequence[Request],
    uncommitted: int,
    shared_available: int,
    critical: set[str],
    window: int,
    chunk_tokens: int,
    slots: int,
    admission_blocks: Callable[[Request], int] | None = None,
) -> Pressure:
    """§5.4, first-fit: greedy-pack admissible waiting requests in queue order into the free
    blocks, uncommitted capacity and free run slots; ``fit_demand`` is capped at ``window``."""
    bs = pool.block_size
    free = pool.num_free
    wd = cd = fit = 0
    free_left, unc_left = free, uncommitted
    for r in waiting:
        d = -(-r.remaining_tokens // bs)
        wd += d
        m = r.metadata
        if m is not None and m.agent_type in critical:
            cd += d
        if slots <= 0 or fit >= window:
            continue
        chunk = -(-min(r.remaining_tokens, chunk_tokens) // bs)
        adm = max(chunk, admission_blocks(r) if admission_blocks else chunk)
        if 0 < chunk <= free_left and adm <= unc_left:
            fit += chunk
            free_left -= chunk
            unc_left -= adm
            slots -= 1
    usage = pool.num_used / max(1, pool.capacity)
    return Pressure(
        usage, free, len(waiting), wd, cd, shared_available, min(window, fit), uncommitted
    )


def evaluate_benefit(
    m: AgentMetadata,
    agent_score: float,
    duration: float,
    transfer_s: float,
    blocks: int,
    cpu_needed: int,
    cpu_available: int,
    p: Pressure,
    churn: float,
    cfg: TimeConfig,
) -> tuple[Reason, float]:
    """The repository's ``evaluate_benefit``, term for term (§5.6). Returns (reason, score)."""
    T = transfer_s
    imp = min(10.0, max(m.importance, min(10.0, agent_score / 2)))
    near = m.near_completion or (m.application_max_depth > 0 and m.remaining_depth <= 1)
    margin = duration - T
    pressure_s = max(0.0, (p.usage - cfg.min_gpu_usage) * 6) + min(
        2.0, p.waiting_demand / (blocks + 1)
    )
    fit_s = min(2.0, p.fit_demand / max(1, blocks))
    stall_s = min(6.0, margin / max(0.25, T))
    upload_ok = 1 if duration >= 2 * T else -1
    cpu_s = 1 if cpu_available >= cpu_needed else -4
    score = stall_s + pressure_s + fit_s + upload_ok + cpu_s - 0.35 * imp - 2 * near - churn
    emergency = (
        p.usage >= cfg.high_pressure_gpu_usage and margin >= max(4 * T, 5.0) and p.waiting_count > 0
    )
    low_press = p.usage < cfg.min_gpu_usage
    no_queue_p = p.waiting_demand <= p.free and p.critical_demand <= p.shared_available
    if not m.preservable:
        return Reason.NOT_ELIGIBLE, score
    if blocks <= 0:
        return Reason.EMPTY, score
    if p.fit_demand <= 0:
        return Reason.NO_WAITING_DEMAND, score
    if cpu_available < cpu_needed:
        return Reason.CPU_CAPACITY, score
    if duration <= T or (margin < max(0.05, 2 * T) and not emergency):
        return Reason.UNPROFITABLE, score
    if low_press and (no_queue_p or p.fit_demand < blocks or p.waiting_count == 0):
        return Reason.LOW_PRESSURE, score
    if (imp >= 8 and not emergency and (near or margin < max(0.5, 8 * T) or upload_ok < 0)) or (
        score < cfg.score_threshold and not emergency
    ):
        return Reason.UNPROFITABLE, score
    return Reason.SELECTED, score
