"""The policy interface and the vLLM-style FCFS baseline.

A policy decides *order* (which waiting request is admitted next), *admission* (whether one
more request may start now), and *victims* (whom to preempt when the running set needs blocks
the pool does not have). The scheduler core owns the mechanics (blocks, budgets, chunking), so
every policy runs on identical machinery and a comparison measures the policy alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from tokencake.scheduler.plan import BlockCopy, StepPlan
from tokencake.scheduler.request import Request


class PoolView(Protocol):
    """What a policy may read of the device block pool."""

    @property
    def capacity(self) -> int: ...
    @property
    def num_free(self) -> int: ...


class Policy:
    """Base policy = vLLM-style FCFS: arrival order, admit while blocks last, preempt newest."""

    name = "vllm"

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Waiting requests in the order they should be considered for admission."""
        return sorted(waiting, key=lambda r: r.arrival_time)

    def can_admit(
        self, request: Request, blocks_needed: int, pool: PoolView, running: Sequence[Request]
    ) -> bool:
        """Extra admission gate on top of 'the blocks for this step are available'."""
        return True

    def choose_victim(self, running: Sequence[Request], needy: Request) -> Request | None:
        """Running request to preempt so that ``needy`` can proceed (None: preempt ``needy``)."""
        candidates = [r for r in running if r is not needy]
        if not candidates:
            return None
        return max(candidates, key=lambda r: r.arrival_time)

    def on_step(
        self, now: float, running: Sequence[Request], waiting: Sequence[Request], pool: PoolView
    ) -> None:
        """Called once per schedule() before any decision (periodic housekeeping)."""

    def on_finished(self, request: Request) -> None:
        """Called when a request leaves the engine (finished or aborted)."""

    # ---- agent-aware hooks (issue #5); the defaults keep the baseline's behaviour -----------
    admission_passes: int = 1  # a second pass retries requests from ``retry_candidates``

    def bind(self, scheduler: Any) -> None:
        """Called once by the scheduler that owns this policy (read its pool, clock, tiers)."""

    def begin_admission_pass(self, pass_index: int) -> None:
        """Admission pass ``pass_index`` (0-based) is about to start."""

    def retry_candidates(self) -> list[Request]:
        """Requests for the next admission pass (after pass 0)."""
        return []

    def skip_denied(self, request: Request) -> bool:
        """After ``request`` was refused: True lets later requests still be considered this
        pass (the refusal concerned only this request), False stops admission (strict order)."""
        return False

    def on_admitted(self, request: Request, now: float) -> None:
        """``request`` moved from waiting to running this step."""

    def on_preempted(self, request: Request) -> None:
        """``request`` was preempted (its KV released or swapped) and requeued."""

    def on_generation_finished(self, request: Request, pool: PoolView) -> None:
        """A metadata-carrying request finished normally; its blocks are still held (a policy
        may take its own references here to retain them)."""

    def committed_blocks(self, now: float) -> int:
        """Free blocks promised to restores in progress: admission may not use them."""
        return 0

    def finalize_plan(self, plan: StepPlan, now: float) -> None:
        """Last word on this step's plan (e.g. append the policy's own block copies)."""

    @property
    def copies_in_flight(self) -> int:
        """Policy-issued copies not yet reported done."""
        return 0

    def on_copies_done(self, done: Sequence[BlockCopy], failed: Sequence[BlockCopy]) -> None:
        """Completion of copies this policy issued."""
        if done or failed:
            raise ValueError(f"completion of unknown copy {(list(done) + list(failed))[0].tag!r}")

    def on_admission_stalled(self) -> bool:
        """Nothing is running and no waiting request could start: release held capacity.
        Returns True if anything was released."""
        return False

    def on_lifecycle_event(self, disposition: Any, body: dict) -> None:
        """A client lifecycle event was applied (the lifecycle listeners already ran)."""

    def check_request(self, request: Request, now: float) -> None:
        """Recompute, uncached and for ``request`` alone, everything this policy derives from
        its data; raise if any of it fails. The scheduler calls it on every live request when
        a batch-wide phase raised without naming a request, to find the culprit."""

    def next_due(self) -> float:
        """Clock time at which this policy has timed work (an upload, a TTL) even if no
        request runs; ``math.inf`` when none. An idle engine steps once it is reached."""
        return math.inf


class VLLMPolicy(Policy):
    """Explicit name for the baseline."""
