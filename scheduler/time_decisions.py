"""The Time Scheduler's per-tool-call decision: the three actions, what a decision rule sees
(:class:`DecisionContext`) and the rules of the compared systems.

* :func:`tokencake_decide`: OFFLOAD when the benefit function selects it (and
  ``offload.selective_offload`` is on: off by default since issue 12), else KEEP when
  holding the blocks costs less than getting them back, else DROP;
* :func:`continuum_decide`: KEEP (a TTL pin) when the tool is predicted short;
* :func:`infercept_decide`: InferCept's min-waste rule over preserve / discard / swap.

A rule only chooses; :class:`~tokencake.scheduler.time_sched.TimeScheduler` carries the action
out (and overrides an impossible one: OFFLOAD without a host tier, a KEEP past its TTL).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokencake.scheduler.lifecycle import LifecycleRecord
from tokencake.scheduler.offload_benefit import Pressure, Reason

if TYPE_CHECKING:
    from tokencake.scheduler.time_sched import TimeScheduler


class Action(enum.Enum):
    """What happens to one tool call's KV while the tool runs."""

    KEEP = "keep"
    OFFLOAD = "offload"
    DROP = "drop"


@dataclass
class DecisionContext:
    """Everything a decide function may look at for one tool call."""

    rec: LifecycleRecord
    now: float
    remaining: float
    device_blocks: int  # contiguous device-valid prefix
    offload_blocks: int  # contiguous prefix preservable to host within the time window
    new_blocks: int  # of those, not already on host
    transfer_s: float
    pressure: Pressure
    reason: Reason
    score: float
    capacity: int
    running_blocks: int
    host_available: bool


Decide = Callable[[DecisionContext, "TimeScheduler"], Action]


def tokencake_decide(ctx: DecisionContext, ts: TimeScheduler) -> Action:
    """OFFLOAD when the benefit function selects it; else KEEP when holding the blocks for the
    rest of the stall costs less throughput than recomputing them later, else DROP."""
    if ctx.reason is Reason.SELECTED and ts.cfg.selective_offload:
        return Action.OFFLOAD
    if not ctx.rec.metadata.preservable or ctx.device_blocks == 0 or not ts.cfg.keep:
        return Action.DROP
    return Action.KEEP if keep_cost(ctx) <= recompute_cost(ctx, ts) else Action.DROP


def keep_cost(ctx: DecisionContext) -> float:
    """Throughput-seconds lost by holding the blocks for the rest of the stall: the share of
    memory held, times the time, times how much the queue actually wants memory."""
    p = ctx.pressure
    q = min(1.0, p.waiting_demand / max(1, p.free))
    return ctx.remaining * (ctx.device_blocks / max(1, ctx.capacity)) * q


def recompute_cost(ctx: DecisionContext, ts: TimeScheduler) -> float:
    """Cost of getting the blocks back once dropped: the prefix the host tier holds is copied
    in, the rest recomputed."""
    n = ctx.device_blocks
    on_host = 0
    if ts.host is not None and ctx.rec.snapshot:
        on_host = len(ts.host.lookup_prefix(list(ctx.rec.snapshot[:n])))
    return ts.cost.copy_time(on_host, "h2d") + ts.cost.recompute_time(
        (n - on_host) * ts.pool.block_size, 0
    )


def continuum_decide(ctx: DecisionContext, ts: TimeScheduler, threshold_s: float = 2.0) -> Action:
    """Continuum: pin a tool-calling agent's KV for a TTL when the tool is predicted short."""
    if ctx.device_blocks == 0:
        return Action.DROP
    return Action.KEEP if ctx.rec.predicted <= threshold_s else Action.DROP


def infercept_decide(ctx: DecisionContext, ts: TimeScheduler) -> Action:
    """InferCept's min-waste rule (simplified; memory x time in block-seconds):
    preserve = M*T; discard = recompute(C) * (M + M_running); swap = (d2h+h2d)(M) * M_running."""
    M = ctx.device_blocks
    if M == 0:
        return Action.DROP
    C = M * ts.pool.block_size
    waste_keep = M * ctx.remaining
    waste_drop = ts.cost.recompute_time(C, 0) * (M + ctx.running_blocks)
    options = [(waste_keep, 0, Action.KEEP), (waste_drop, 2, Action.DROP)]
    if ctx.host_available:
        t = ts.cost.copy_time(M, "d2h") + ts.cost.copy_time(M, "h2d")
        if t < ctx.remaining:
            options.append((t * ctx.running_blocks, 1, Action.OFFLOAD))
    return min(options)[2]
