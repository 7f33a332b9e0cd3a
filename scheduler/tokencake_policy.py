"""Agent-aware policies on the shared scheduler core.

* ``tokencake``: Space Scheduler (scores, reservations, admission, victims) and Time
  Scheduler (keep / drop per tool call; offload with predictive upload is
  ``offload.selective_offload``, off by default since issue 12). Since issue 12 it
  also writes every finished request's blocks back to the host tier and swaps victims
  (``offload.write_back_all``), defers a fan-out sibling whose next block a running prefill is
  computing (``scheduling.defer_inflight_prefix``), and admits by the current sequence
  (the paper's full-future rule is ``scheduling.reserve_generation_tokens``, off by default),
  and backfills behind a blocked queue head what cannot delay it (``scheduling.backfill``,
  ``scheduler/backfill.py``);
  ``scheduler/ablations.py`` switches each mechanism off alone;
* ``tokencake-space`` and ``tokencake-time``: one half each (the other half is the baseline);
* ``infercept``: per tool call preserve / discard / swap by its min-waste rule, swap-in when the
  tool returns (no prediction), FCFS;
* ``continuum``: pin a tool-calling agent's KV for a TTL when the tool is predicted short,
  program-level FCFS (a returning turn keeps its program's place).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from tokencake.scheduler.backfill import Backfill
from tokencake.scheduler.faults import RequestFault
from tokencake.scheduler.handoff import HandOff
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.offload_benefit import Pressure, waiting_pressure
from tokencake.scheduler.policy import Admission, Policy, PolicyContext, TimeSchedulerStats
from tokencake.scheduler.queue_order import SortedQueue
from tokencake.scheduler.request import Request
from tokencake.scheduler.sharing import Prefills, waits_for_inflight
from tokencake.scheduler.space import Denial, SpaceScheduler
from tokencake.scheduler.stall_free import stall_free_cap
from tokencake.scheduler.time_decisions import (
    Decide,
    continuum_decide,
    infercept_decide,
    tokencake_decide,
)
from tokencake.scheduler.time_sched import TimeScheduler
from tokencake.scheduler.victims import restore_seconds


class TokencakePolicy(Policy):
    """Tokencake's two schedulers behind the core's policy hooks."""

    name = "tokencake"

    def __init__(
        self,
        ctx: PolicyContext,
        *,
        space: bool = True,
        time: bool = True,
        decide: Decide = tokencake_decide,
        predictive_upload: bool | None = None,
        reevaluate: bool = True,
        reuse_eviction: bool | None = None,
        write_back_all: bool | None = None,
    ) -> None:
        super().__init__(ctx)
        self.config = ctx.tokencake
        self.use_space = space and self.config.scheduling.enabled
        self.use_time = time and self.config.offload.enabled
        self.write_back_all = self.use_time and (
            self.config.offload.write_back_all if write_back_all is None else write_back_all
        )
        self._inflight: set[bytes] | None = None  # block hashes running prefills will compute
        # The running requests that may still prefill (None: no in-flight deferral).
        self._prefills: Prefills | None = None
        if self.use_space and self.config.scheduling.defer_inflight_prefix:
            self._prefills = Prefills()
        self.sharing_deferrals = 0
        self._leaf_blocks: dict[str, list[int]] = {}  # finished leaf agent -> blocks to demote
        self.space: SpaceScheduler | None = None
        self.time: TimeScheduler | None = None
        if self.use_space:
            self.space = SpaceScheduler(self.config.scheduling, ctx.pool, ctx.config.max_model_len)
        if self.use_time:
            self.time = TimeScheduler(
                self.config.offload, ctx.pool, ctx.lifecycle, ctx.copies, host=ctx.host_pool,
                cost=ctx.cost_model, decide=decide, predictive_upload=predictive_upload,
                reevaluate=reevaluate, reuse_eviction=reuse_eviction,
            )  # fmt: skip
        self.backfill: Backfill | None = None
        if self.use_space and self.config.scheduling.backfill:
            kept = self.may_keep if self.config.scheduling.backfill_sure_extra else None
            self.backfill = Backfill(ctx.pool, ctx.config.max_prefill_chunk, kept=kept)
        self.handoff: HandOff | None = None
        if self.use_space and self.config.scheduling.successor_handoff_s > 0:
            self.handoff = HandOff(ctx.pool, self.config.scheduling.successor_handoff_s)
        self._app_fcfs = SortedQueue()  # program-level FCFS, sorted incrementally
        self._passes = 2 if self.use_space else 1  # pass 1 retries reservation refusals
        self._stall_free = self.use_space and self.config.scheduling.stall_free_prefill
        self._pass = 0
        self._retry: list[Request] = []

    # ---- per step -----------------------------------------------------------------------------
    def prefill_cap(self, running: Sequence[Request]) -> int | None:
        if not self._stall_free:
            return None
        return stall_free_cap(self.ctx.cost_model, running, self.ctx.pool.block_size)

    def on_step(self, now: float, running: Sequence[Request], waiting: Sequence[Request]) -> None:
        if self._prefills is not None:  # inflight_hashes(running), from the few that may prefill
            self._inflight = self._prefills.inflight(self.ctx.pool.block_size)
        # Space first: the Time Scheduler's pressure forecast reads this step's plan (scores,
        # uncommitted capacity). Run after the tick, it read the previous step's plan, which
        # still counted a just-finished agent's growth and hid the queue's real fit demand.
        if self.space is not None:
            self.space.begin_step(now, running, waiting, self.committed_blocks(now))
        if self.time is not None:
            ts = self.time
            pressure = lambda: self._pressure(now, running, waiting)  # noqa: E731
            try:
                ts.tick(now, waiting, running, pressure, self._agent_score)
            except Exception as exc:
                # The tick works lifecycle by lifecycle: the one it was on is the culprit.
                if ts.current is None or isinstance(exc, RequestFault):
                    raise
                raise RequestFault(ts.current, "the Time Scheduler", exc) from exc
            if self.space is not None:  # the tick's pins, uploads and releases moved capacity
                self.space.recount(self.committed_blocks(now))

    def _agent_score(self, m: AgentMetadata) -> float:
        if self.space is None or self.space.plan is None:
            return 0.0
        return self.space.plan.scores.get(m.agent_type, 0.0)

    def _pressure(
        self, now: float, running: Sequence[Request], waiting: Sequence[Request]
    ) -> Pressure:
        pool = self.ctx.pool
        cfg = self.ctx.config
        sp = self.space
        if sp is not None and sp.plan is not None:
            uncommitted = sp.uncommitted
            shared, _ = sp._availability()
            critical = sp.plan.critical
            adm = lambda r: -(-sp.admission_tokens(r) // pool.block_size) - len(r.block_ids)  # noqa: E731
        else:
            uncommitted = pool.num_free - self.committed_blocks(now)
            shared, critical, adm = pool.num_free, set(), None
        slots = cfg.max_num_seqs - len(running)
        return waiting_pressure(pool, waiting, uncommitted, shared, critical,
                                self.config.offload.eviction_window_blocks, cfg.max_prefill_chunk,
                                slots, adm)  # fmt: skip

    # ---- ordering and admission -----------------------------------------------------------------
    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Pass 0's order: the Space Scheduler's scores (or program-level FCFS), else FCFS."""
        if self.space is not None:
            if self.config.scheduling.admission_order == "application-fcfs":
                return self._app_fcfs.order(waiting)
            if self.config.scheduling.admission_order == "arrival":
                return list(super().admission_order(0, waiting, now) or ())
            order = self.space.order(waiting)
            if self.handoff is not None:
                order = self.handoff.promote(order, waiting, now)
            return order
        return list(super().admission_order(0, waiting, now) or ())

    def admission_order(
        self, pass_index: int, waiting: Sequence[Request], now: float
    ) -> Sequence[Request] | None:
        if pass_index >= self._passes:
            return None
        self._pass = pass_index
        if self.backfill is not None and (
            pass_index == 0 or not self.config.scheduling.backfill_second_pass
        ):
            # The second pass retries reservation refusals; with backfill_second_pass it
            # keeps the first pass's blocked head, shadow and left-over blocks (EASY's promise).
            self.backfill.reset()
        if pass_index == 0:
            order = self.order_waiting(waiting, now)
            self._retry = []
            return order
        return list(self._retry)

    def admit(self, request: Request, blocks_needed: int, running: Sequence[Request]) -> Admission:
        if self._inflight and waits_for_inflight(request, self._inflight, self.ctx.pool.block_size):
            # A running prefill is computing its next block: hit it in a step or two instead
            # of computing (and holding) a second copy.
            self.sharing_deferrals += 1
            return Admission.DEFER
        ts = self.time
        if ts is not None and ts.uploading:
            # Its next block is being uploaded right now: wait one step and hit it on device.
            i = len(request.block_ids)
            if i < len(request._block_hashes) and request._block_hashes[i] in ts.uploading:
                return Admission.DEFER
        if self.space is None:
            return Admission.ADMIT
        bf = self.backfill
        if bf is not None and bf.exhausted:
            return Admission.STOP
        d = self.space.check(request, blocks_needed, bool(running), self._pass == 1)
        if d is None:
            if (
                bf is not None
                and bf.active
                and not bf.allows(request, self._demand(request, blocks_needed))
            ):
                return Admission.DEFER  # would hold blocks the blocked head is promised
            return Admission.ADMIT
        if d is Denial.RESERVATION:
            if self._pass == 0:
                self._retry.append(request)
            return Admission.DEFER  # only this request's reservation is short
        if bf is not None:
            # Short of capacity, or its resume guard holds it back: either way it blocks the
            # queue, so it becomes the protected head (backfilling behind a guarded head was
            # most of the gain on code-writer: 319.4 s vs 337.6 s, bench/RESULTS.md).
            short = self._demand(request, blocks_needed) - self.space.uncommitted
            if bf.blocked(short, running):
                return Admission.DEFER  # keep scanning for requests that cannot delay it
        return Admission.STOP

    def on_blocked(
        self, request: Request, blocks_needed: int, running: Sequence[Request]
    ) -> Admission:
        """Its next chunk does not fit: it becomes the protected head (or, behind one, is
        skipped) when backfill is on."""
        bf = self.backfill
        if bf is None or self.space is None or bf.exhausted:
            return Admission.STOP
        short = max(1, self._demand(request, blocks_needed) - self.space.uncommitted)
        return Admission.DEFER if bf.blocked(short, running) else Admission.STOP

    def may_keep(self, request: Request) -> bool:
        """Whether the Time Scheduler may pin ``request``'s blocks when it finishes: a KEEP
        is possible for the tool call that follows it (its lifecycle is open and its agent is
        preservable), so backfill must not count them as freed at its finish."""
        if self.time is None or not self.config.offload.keep:
            return False
        rec = self.ctx.lifecycle.records.get(request.request_id)
        return rec is not None and not rec.terminal and rec.metadata.preservable

    def _demand(self, request: Request, blocks_needed: int) -> int:
        """Capacity ``request`` (prefix hit applied) takes from ``uncommitted`` when admitted,
        as the Space check counts it: its new blocks plus the cached blocks its prefix hit
        revives (they were free, and counted in ``uncommitted``, until it took them).

        Without the revived blocks a head denied only because of them (a writer reviving its
        predecessor's 800 cached blocks) looked 0 blocks short: backfill gave its capacity to
        the requests behind it, step after step (bench/RESULTS.md, "Fifth round")."""
        pool = self.ctx.pool
        full = -(-self.space.admission_tokens(request) // pool.block_size) - len(request.block_ids)
        revived = sum(1 for b in request.block_ids if pool.ref_count(b) == 1)
        return max(blocks_needed, full) + revived

    def on_admitted(self, request: Request, now: float) -> None:
        if self._prefills is not None:
            self._prefills.admitted(request)
        if self._inflight is not None and request.is_prefill:
            bs = self.ctx.pool.block_size
            self._inflight.update(request.block_hashes(bs)[request.num_computed_tokens // bs :])
        if self.space is not None:
            self.space.commit(request, now, self._pass == 1)

    # ---- preemption and exits -------------------------------------------------------------------
    def choose_victim(self, running: Sequence[Request], needy: Request) -> Request | None:
        if self.space is not None:
            pool = self.ctx.pool
            cfg = self.ctx.config
            target = needy.num_computed_tokens + min(needy.remaining_tokens, cfg.max_prefill_chunk)
            needed = max(1, -(-target // pool.block_size) - len(needy.block_ids) - pool.num_free)
            restorable = self._restorable(running)
            restore_s = None
            if self.config.scheduling.victim_by_restore_time:
                restore_s = restore_seconds(
                    running, restorable, self.ctx.cost_model, pool.block_size
                )
            v = self.space.victim(running, needy, needed, self.ctx.clock(), restorable, restore_s)
            if v is not False:
                return v  # type: ignore[return-value]
        return super().choose_victim(running, needy)

    def _restorable(self, running: Sequence[Request]) -> dict[str, int]:
        """Tokens of each running request's prefix currently restorable from the host tier."""
        host = self.ctx.host_pool
        if host is None:
            return {}
        bs = self.ctx.pool.block_size
        return {r.request_id: len(host.lookup_prefix(r._block_hashes[: r.num_computed_tokens // bs])) * bs
                for r in running}  # fmt: skip

    def check_request(self, request: Request, now: float) -> None:
        if self.space is not None:
            self.space.check_request(request, now)

    def preemption_mode(self, victim: Request) -> str | None:
        """Swap victims when every block is written back anyway (their pages come back by a
        copy, not a recompute)."""
        return "swap" if self.write_back_all and self.ctx.host_pool is not None else None

    def writes_back(self, request: Request) -> bool:
        """Every finished request's blocks go to the host tier, except a leaf agent's (no
        successor reads them; they are demoted for eviction instead)."""
        return self.write_back_all and request.request_id not in self._leaf_blocks

    def on_preempted(self, request: Request) -> None:
        if self.space is not None:
            self.space.on_preempted(request)

    def on_generation_finished(self, request: Request) -> None:
        m = request.metadata
        if (
            self.time is not None
            and self.time.reuse_eviction
            and m.application_max_depth > 0  # the client described its DAG ...
            and m.out_degree == 0  # ... and nothing in it follows this agent
            and not m.reusable_prefix
        ):
            # Its own tokens (past the prefix it found cached) have no expected reader.
            first = request.num_cached_tokens // self.ctx.pool.block_size
            self._leaf_blocks[request.request_id] = list(request.block_ids[first:])

    def on_finished(self, request: Request) -> None:
        if self.space is not None:
            self.space.on_finished(request, self.ctx.clock())
        if self.handoff is not None:
            self.handoff.on_finished(request, self.ctx.clock())
        if self.time is not None:
            self.time.forget(request)
        leaf = self._leaf_blocks.pop(request.request_id, None)
        if leaf and self.time is not None:  # released by now: evict these first
            self.time.demote_unneeded(leaf)

    # ---- the Time Scheduler's plumbing ----------------------------------------------------------
    def committed_blocks(self, now: float) -> int:
        return self.time.committed_blocks(now) if self.time is not None else 0

    def on_admission_stalled(self) -> bool:
        return self.time.relieve() if self.time is not None else False

    def release_for_growth(self, blocks: int) -> bool:
        if (
            self.time is None
            or not self.config.offload.growth_release
            or not self.time.release_pins(blocks)
        ):
            return False
        if self.space is not None:  # the unpinned blocks are uncommitted capacity again
            self.space.recount(self.committed_blocks(self.ctx.clock()))
        return True

    def next_due(self) -> float:
        return self.time.next_due() if self.time is not None else math.inf

    def time_scheduler_stats(self) -> TimeSchedulerStats | None:
        if self.time is None:
            return None
        return TimeSchedulerStats(self.time.stalled_blocks, self.time.counters)

    @property
    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {"inflight_prefix_deferrals": self.sharing_deferrals}
        if self.backfill is not None:
            out["backfilled"] = self.backfill.backfilled
        if self.handoff is not None:
            out["handoff_promotions"] = self.handoff.promoted
        for part in (self.space, self.time):
            if part is not None:
                for k, v in part.counters.items():
                    out[k] = out.get(k, 0) + v
        return out


class TokencakeSpacePolicy(TokencakePolicy):
    name = "tokencake-space"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx, space=True, time=False)


class TokencakeTimePolicy(TokencakePolicy):
    name = "tokencake-time"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx, space=False, time=True)


class TokencakeAppFCFSPolicy(TokencakePolicy):
    """Tokencake with program-level FCFS admission (``scheduling.admission_order``)."""

    name = "tokencake-fcfs"

    def __init__(self, ctx: PolicyContext) -> None:
        sched = dataclasses.replace(ctx.tokencake.scheduling, admission_order="application-fcfs")
        super().__init__(
            dataclasses.replace(ctx, tokencake=dataclasses.replace(ctx.tokencake, scheduling=sched))
        )


class InferCeptPolicy(TokencakePolicy):
    """InferCept: min-waste preserve / discard / swap per tool call; swap-in on return."""

    name = "infercept"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx, space=False, time=True, decide=infercept_decide,
                         predictive_upload=False, reevaluate=False, reuse_eviction=False,
                         write_back_all=False)  # fmt: skip


class ContinuumPolicy(TokencakePolicy):
    """Continuum: TTL pins for short tool calls and program-level FCFS."""

    name = "continuum"

    def __init__(self, ctx: PolicyContext, pin_threshold_s: float = 2.0) -> None:
        super().__init__(ctx, space=False, time=True,
                         decide=lambda ctx, ts: continuum_decide(ctx, ts, pin_threshold_s),
                         predictive_upload=False, reevaluate=False, reuse_eviction=False,
                         write_back_all=False)  # fmt: skip

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return self._app_fcfs.order(waiting)
