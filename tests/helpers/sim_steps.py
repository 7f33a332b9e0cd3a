"""Step a simulated scheduler to the end, recording when each request started."""

from __future__ import annotations

from collections.abc import Callable

from tokencake.scheduler.core import Scheduler
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.scheduler.sim_executor import SimExecutor, sim_step


def start_steps(
    s: Scheduler,
    ex: SimExecutor,
    reqs: dict[str, Request],
    step: int,
    limit: int,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Step ``s`` until it has no work; the step (counted on from ``step``) at which each of
    ``reqs`` first left the waiting queue. ``after_step(step)`` runs after every step and may
    add requests to ``reqs``."""
    started: dict[str, int] = {}
    while s.has_work:
        sim_step(s, ex)
        step += 1
        for k, r in reqs.items():
            if r.status is not RequestStatus.WAITING and k not in started:
                started[k] = step
        if after_step is not None:
            after_step(step)
        assert step < limit
    return started
