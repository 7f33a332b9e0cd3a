"""The policy interface and the vLLM-style FCFS baseline.

A policy decides *order* (which waiting request is admitted next), *admission* (whether one
more request may start now), and *victims* (whom to preempt when the running set needs blocks
the pool does not have). The scheduler core owns the mechanics (blocks, budgets, chunking), so
every policy runs on identical machinery and a comparison measures the policy alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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


class VLLMPolicy(Policy):
    """Explicit name for the baseline."""
