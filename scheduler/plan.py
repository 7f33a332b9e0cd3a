"""What one engine step will do: the ``StepPlan`` a scheduler hands to an executor, and the
:class:`Executor` interface that runs it (the step loop is ``core.StepLoop``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from tokencake.scheduler.request import Request


class ScheduledChunk(NamedTuple):
    """Compute ``num_tokens`` tokens of ``request`` starting at ``start`` (its computed count).

    A named tuple (immutable, like the frozen dataclass it was): the scheduler makes one per
    running row every step, and a tuple is several times cheaper to build."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so its last logit is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass(frozen=True)
class BlockCopy:
    """Copy KV pages between device blocks and host blocks (memory hierarchy)."""

    direction: str  # "d2h" or "h2d"
    device_blocks: tuple[int, ...]
    host_blocks: tuple[int, ...]
    tag: str = ""


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.copies


class Executor(Protocol):
    """What the step loop needs of an executor (``tokencake/runner.py``'s, the simulator's)."""

    def execute(self, plan: StepPlan) -> Mapping[str, int]:
        """Issue the plan's copies and compute its chunks; the sampled token id of every
        request whose chunk samples (nothing when the plan has no chunks)."""
        ...

    def landed_copies(self) -> tuple[Sequence[BlockCopy], Sequence[BlockCopy]]:
        """Copies that finished and copies that failed since the last call."""
        ...
