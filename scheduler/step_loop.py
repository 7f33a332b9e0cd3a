"""The one step loop: schedule -> execute -> update, shared by the engine and the simulator.

The executor is the only difference between a real and a simulated step (DESIGN.md rule 4):
the real one runs the jitted model and the transfer engine, the simulated one a cost model on a
virtual clock. Both report copy completions through :meth:`Executor.landed_copies`, which the
loop hands to the scheduler's copy tracker before planning and again right after executing
(a simulated copy lands within the step that issued it; a real one whenever the device says).

Callers that observe the plan (the benchmark's metrics) or wrap execution (the engine's fault
handling, detokenization) use the three phases; :meth:`StepLoop.step` runs them in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from tokencake.scheduler.core import Scheduler
from tokencake.scheduler.plan import BlockCopy, StepPlan
from tokencake.scheduler.request import Request


class Executor(Protocol):
    """What the loop needs of an executor."""

    def execute(self, plan: StepPlan) -> Mapping[str, int]:
        """Issue the plan's copies and compute its chunks; the sampled token id of every
        request whose chunk samples (nothing when the plan has no chunks)."""
        ...

    def landed_copies(self) -> tuple[Sequence[BlockCopy], Sequence[BlockCopy]]:
        """Copies that finished and copies that failed since the last call."""
        ...


class StepLoop:
    """One scheduler driving one executor."""

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor

    def report_copies(self) -> None:
        """Hand copies the executor finished to the scheduler (fences drop, pages publish)."""
        done, failed = self.executor.landed_copies()
        if done or failed:
            self.scheduler.on_copies_done(done, failed)

    def plan(self) -> StepPlan:
        """Phase 1: report landed copies, then choose this step's work."""
        self.report_copies()
        return self.scheduler.schedule()

    def execute(self, plan: StepPlan) -> Mapping[str, int]:
        """Phase 2: run the plan (copies first, then compute) and report what landed."""
        sampled = self.executor.execute(plan)
        self.report_copies()
        return sampled

    def update(self, plan: StepPlan, sampled: Mapping[str, int]) -> list[Request]:
        """Phase 3: advance progress and append tokens; the requests that got one."""
        return self.scheduler.update(plan, sampled)

    def step(self) -> tuple[StepPlan, list[Request]]:
        """All three phases: the plan and the requests that got a token."""
        plan = self.plan()
        return plan, self.update(plan, self.execute(plan))
