"""The step loop shared by the engine and the simulator: :class:`StepLoop` drives one
:class:`~tokencake.scheduler.core.Scheduler` and one executor through schedule -> execute ->
update (DESIGN.md rule 4: the executor is the only difference between a real and a simulated
step). Re-exported by ``core.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokencake.scheduler.plan import Executor, StepPlan
from tokencake.scheduler.request import Request

if TYPE_CHECKING:
    from tokencake.scheduler.core import Scheduler


class StepLoop:
    """One scheduler driving one executor: :meth:`plan`, :meth:`execute`, :meth:`update`.

    Landed copies go to the scheduler's copy tracker before planning and again right after
    executing (a simulated copy lands within the step that issued it; a real one whenever the
    device says). Callers that observe the plan (the benchmark's metrics) or wrap execution
    (the engine's fault handling, detokenization) use the three phases; :meth:`step` runs
    them in order."""

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor

    def report_copies(self) -> None:
        """Hand copies the executor finished (or gave up on) to the scheduler's copy tracker,
        the core's and the policy's alike (fences drop, pages publish, issuers continue)."""
        done, failed = self.executor.landed_copies()
        if done or failed:
            self.scheduler.copies.complete(done, failed)

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
