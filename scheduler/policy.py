"""The policy interface, the typed view a policy is built with, and the vLLM-style baseline.

A policy decides *order* (which waiting request is considered for admission next),
*admission* (whether one more request may start now), *victims* (whom to preempt when the
running set needs blocks the pool does not have, and whether the victim's KV is swapped or
recomputed) and what to do with KV between an agent's calls (the Time Scheduler). The
scheduler core owns the mechanics (blocks, budgets, chunking, copies), so every policy runs on
identical machinery and a comparison measures the policy alone.

A policy is built once per scheduler from a :class:`PolicyContext` (``factory(ctx)``); it reads
the pools, the clock, the cost model and the lifecycle registry through that view and never has
attributes set on it afterwards. The hooks below are the whole interface; each has a default
that keeps the baseline's behaviour, so a policy overrides only what it changes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.arrival_order import ArrivalOrder
from tokencake.scheduler.config import SchedulerConfig
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.lifecycle import Lifecycle
from tokencake.scheduler.request import Request
from tokencake.scheduler.tokencake_config import TokencakeConfig

_ARRIVAL = attrgetter("arrival_time")


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may read (and, through the pools and the copy tracker, act on).

    Built by the :class:`~tokencake.scheduler.core.Scheduler` before its policy; the objects
    are the scheduler's own (one owner per state), so a policy sees the same pool, lifecycles
    and copies as the core."""

    config: SchedulerConfig
    pool: BlockPool
    host_pool: HostBlockPool | None
    cost_model: CostModel
    clock: Callable[[], float]
    lifecycle: Lifecycle
    copies: CopyTracker  # issue block copies here; completions come back to their callback
    tokencake: TokencakeConfig  # the agent-aware policies' knobs (defaults: the paper's)


PolicyFactory = Callable[[PolicyContext], "Policy"]


@dataclass(frozen=True)
class TimeSchedulerStats:
    """What observers (the benchmark's metrics and reports) read of a policy's Time Scheduler.

    Observation only: nothing in the scheduler decides from it."""

    stalled_blocks: int  # device blocks held for agents waiting on a tool (pinned or copied out)
    counters: Mapping[str, int]  # the Time Scheduler's decisions and events, by name


class Admission(enum.Enum):
    """A policy's verdict on admitting one waiting request (see :meth:`Policy.admit`)."""

    ADMIT = "admit"
    DEFER = "defer"  # not this one now, but later requests may still be considered this pass
    STOP = "stop"  # not this one, and nobody behind it this pass (strict order)


class Policy:
    """Base policy = vLLM-style FCFS: arrival order, admit while blocks last, preempt newest."""

    name: ClassVar[str] = "vllm"
    _arrivals: ArrivalOrder | None = None  # the FCFS order, kept between steps

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    # ---- admission ----------------------------------------------------------------------------
    def admission_order(
        self, pass_index: int, waiting: Sequence[Request], now: float
    ) -> Sequence[Request] | None:
        """Candidates of admission pass ``pass_index`` (0, 1, ..) in the order they are
        considered; ``None`` ends admission for this step. Pass 0 sees the whole queue; a
        later pass typically retries requests an earlier one deferred."""
        if pass_index:
            return None
        if self._arrivals is None:  # made here: subclasses need not call our __init__
            self._arrivals = ArrivalOrder()
        return self._arrivals.order(waiting)  # sorted(waiting, key=arrival), kept

    def admit(self, request: Request, blocks_needed: int, running: Sequence[Request]) -> Admission:
        """Gate on top of "the blocks for this step are free": ``request`` (its prefix hit
        applied) needs ``blocks_needed`` more blocks now."""
        return Admission.ADMIT

    def on_blocked(
        self, request: Request, blocks_needed: int, running: Sequence[Request]
    ) -> Admission:
        """The pool cannot give ``request`` the ``blocks_needed`` blocks of its next chunk:
        STOP (the default, strict order) ends this admission pass; DEFER scans on behind it."""
        return Admission.STOP

    def on_admitted(self, request: Request, now: float) -> None:
        """``request`` moved from waiting to running this step."""

    def committed_blocks(self, now: float) -> int:
        """Free blocks promised to restores in progress: admission may not use them."""
        return 0

    # ---- preemption ---------------------------------------------------------------------------
    def choose_victim(self, running: Sequence[Request], needy: Request) -> Request | None:
        """Running request to preempt so that ``needy`` can proceed (None: preempt ``needy``)."""
        candidates = [r for r in running if r is not needy]
        if not candidates:
            return None
        return max(candidates, key=lambda r: r.arrival_time)

    def preemption_mode(self, victim: Request) -> str | None:
        """``"swap"`` or ``"recompute"`` for this victim; None: the scheduler config's mode."""
        return None

    def on_preempted(self, request: Request) -> None:
        """``request`` was preempted (its KV released or swapped) and requeued."""

    # ---- the step and request exits -----------------------------------------------------------
    def prefill_cap(self, running: Sequence[Request]) -> int | None:
        """Prefill tokens this step may carry at most (running chunks and admissions together;
        the token budget still applies). None: only the budget (vLLM's chunked prefill)."""
        return None

    def on_step(self, now: float, running: Sequence[Request], waiting: Sequence[Request]) -> None:
        """Called once per schedule() before any decision (periodic housekeeping)."""

    def on_generation_finished(self, request: Request) -> None:
        """A metadata-carrying request finished normally; its blocks are still held (a policy
        may take its own references here to retain them)."""

    def on_finished(self, request: Request) -> None:
        """Called when a request leaves the engine (finished or aborted)."""

    def writes_back(self, request: Request) -> bool:
        """Whether the core copies ``request``'s computed full blocks to the host tier when it
        finishes (vLLM CPU offloading / LMCache-style write-back; blocks the host already
        holds are not copied again)."""
        return False

    def on_admission_stalled(self) -> bool:
        """Nothing is running and no waiting request could start: release held capacity.
        Returns True if anything was released."""
        return False

    def release_for_growth(self, blocks: int) -> bool:
        """A running request is ``blocks`` blocks short of its next chunk and would otherwise
        preempt (or be preempted): release held capacity that no running request uses (pins
        kept for agents in a tool call). True if any blocks became free."""
        return False

    def next_due(self) -> float:
        """Clock time at which this policy has timed work (an upload, a TTL) even if no
        request runs; ``math.inf`` when none. An idle engine steps once it is reached."""
        return math.inf

    def check_request(self, request: Request, now: float) -> None:
        """Recompute, uncached and for ``request`` alone, everything this policy derives from
        its data; raise if any of it fails. The scheduler calls it on every live request when
        a batch-wide phase raised without naming a request, to find the culprit."""

    # ---- observation (metrics, reports, tests; never read by the core) -------------------------
    @property
    def counters(self) -> Mapping[str, int]:
        """This policy's decision counters by name (the baseline keeps none)."""
        return {}

    def time_scheduler_stats(self) -> TimeSchedulerStats | None:
        """The Time Scheduler's state for observers; None when this policy has none (KV
        between an agent's calls is then left to the prefix cache)."""
        return None


class VLLMPolicy(Policy):
    """vLLM V1's default scheduler, as far as a policy decides it (``bench/README.md`` lists
    the remaining differences):

    * FCFS admission that stops at the first request that does not fit;
    * a waiting request is admitted only when its whole current sequence fits:
      ``ceil(num_tokens / block_size) - len(block_ids) <= num_free`` (the "full-ISL check"
      of the authors' baseline), although the core then allocates only the chunk it runs;
    * when a running request cannot grow, the most recently admitted running request is
      preempted (vLLM's ``self.running.pop()``), possibly the needy request itself.

    Recompute preemption, prefix caching and chunked prefill under the token budget are the
    core's own mechanics.
    """

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._admitted: dict[int, int] = {}  # id(request) -> admission sequence number
        self._seq = 0

    def admit(self, request: Request, blocks_needed: int, running: Sequence[Request]) -> Admission:
        pool = self.ctx.pool
        whole = math.ceil(request.num_tokens / pool.block_size) - len(request.block_ids)
        return Admission.ADMIT if whole <= pool.num_free else Admission.STOP

    def on_admitted(self, request: Request, now: float) -> None:
        self._seq += 1
        self._admitted[id(request)] = self._seq

    def on_preempted(self, request: Request) -> None:
        self._admitted.pop(id(request), None)

    def on_finished(self, request: Request) -> None:
        self._admitted.pop(id(request), None)

    def choose_victim(self, running: Sequence[Request], needy: Request) -> Request | None:
        if not running:
            return None
        return max(running, key=lambda r: self._admitted.get(id(r), 0))
