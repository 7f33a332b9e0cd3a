"""Tokencake's Space Scheduler (paper digest §4.2-§4.8).

Two scores, kept apart (``agent_scores.py``): the per-*request* hybrid score (graph + runtime)
orders the waiting queue, picks victims and decides early borrowing; the per-*agent-type* score
(history + importance) chooses the critical types and sizes their reservations
(``partition.py``).

Capacity is accounted in *committed* blocks: admission counts each request's full future KV
(prompt + ``max_tokens``), so ``uncommitted = free - sum(remaining growth of admitted) -
restore reservations`` gates new work. Reservations split that capacity into a shared pool and
per-critical-type pools; a request is charged its full demand at admission, pool by pool
(shared first, its own reservation, then donors), and the charge is dropped when it leaves.
(The repository charges physical blocks one by one; charging the committed demand is
equivalent under full-future admission and O(1) per request.)
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from itertools import chain

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.agent_scores import AgentHistory, static_parts, time_parts, type_score
from tokencake.scheduler.partition import PartitionPlan, partition
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.scheduler.space_scoring import SpaceScores
from tokencake.scheduler.tokencake_config import SpaceConfig

Charge = list[tuple[str | None, int]]
log = logging.getLogger(__name__)
_WAITING = RequestStatus.WAITING


class Denial(enum.Enum):
    """Why a waiting request was not admitted this step."""

    GENERATION_CAPACITY = "generation_capacity_denied"
    RESERVATION = "reservation_denied"
    RESUME_GUARD = "resume_deferred"


class SpaceScheduler(SpaceScores):
    """Scores and order (:class:`SpaceScores`), partitions, admission accounting and victim
    choice for one engine."""

    def __init__(self, config: SpaceConfig, pool: BlockPool, max_model_len: int) -> None:
        super().__init__(config, pool)
        self.max_model_len = max_model_len
        self.history = AgentHistory(
            config.history_limit, config.history_max_bytes, config.history_ttl_s
        )
        self.plan: PartitionPlan | None = None
        self.step = 0
        self.charges: dict[str, Charge] = {}
        self.used: dict[str | None, int] = {}
        self.uncommitted = 0
        self._growth = 0  # running requests' remaining growth at the last refresh
        self.guard: dict[str, tuple[int, int]] = {}  # resume guard: free at preemption, epoch
        self.epoch = 0  # bumps on every finish
        self.counters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # ---- demand -------------------------------------------------------------------------------
    def admission_tokens(self, r: Request) -> int:
        if not self.cfg.reserve_generation_tokens:
            return r.num_tokens
        # prompt + max_tokens bounds num_tokens, so it is the request's whole future
        return min(len(r.prompt_token_ids) + r.max_tokens, self.max_model_len)

    def remaining_growth(self, r: Request) -> int:
        """Blocks ``r`` may still allocate before it finishes."""
        need = -(-self.admission_tokens(r) // self.pool.block_size) - len(r.block_ids)
        return need if need > 0 else 0

    def check_request(self, r: Request, now: float) -> None:
        """The fault probe: ``r``'s score from scratch (no cache) and its type's score."""
        m = r.metadata
        if m is None:
            return
        static, rr, pg = static_parts(m)
        int(static + time_parts(m, r.arrival_time, now, rr, pg))
        if m.type_key:
            st = self.history.stats.peek(m.type_key)
            if st is not None:
                s = type_score(st, m.importance, 0.0, 1)
                if not math.isfinite(s):
                    raise ValueError(f"agent type score is {s!r}")

    # ---- per-step -----------------------------------------------------------------------------
    def begin_step(
        self,
        now: float,
        running: Sequence[Request],
        waiting: Sequence[Request],
        committed_extra: int,
    ) -> None:
        """Freeze this step's scores, repartition when due, recompute uncommitted capacity."""
        self.step += 1
        self.history.expire(now)
        self.score_step(now, running, waiting)
        if (
            self.plan is None
            or not self.plan.reserved
            or self.step % self.cfg.adjustment_window == 0
        ):
            self.repartition(now, running, waiting)
            self._best(waiting)
        self.refresh_uncommitted(running, committed_extra)

    def refresh_uncommitted(self, running: Sequence[Request], committed_extra: int) -> None:
        """Recompute the capacity no admitted request or restore has claimed: free blocks minus
        running requests' remaining growth minus ``committed_extra`` (restores)."""
        # remaining_growth() over every running request, every step: one plain loop. Three
        # np.fromiter columns and an expression measured 2-3x slower inside a step (about 10 us
        # per numpy call once the rest of the step has run; 0.1 vs 0.15-0.29 ms for 256 rows).
        # A row's growth is ceil(tokens / bs) - blocks when positive, which is
        # ceil((tokens - blocks * bs) / bs) when tokens pass its blocks' capacity (blocks * bs is
        # a multiple of bs): the division runs only for those rows (a few a step).
        bs, growth = self.pool.block_size, 0
        if self.cfg.reserve_generation_tokens:
            limit = self.max_model_len
            for r in running:
                tokens = len(r.prompt_token_ids) + r.max_tokens
                short = (tokens if tokens < limit else limit) - len(r.block_ids) * bs
                if short > 0:
                    growth += -(-short // bs)
        else:
            for r in running:
                short = len(r.prompt_token_ids) + len(r.output_token_ids) - len(r.block_ids) * bs
                if short > 0:
                    growth += -(-short // bs)
        self._growth = growth
        self.uncommitted = self.pool.num_free - growth - committed_extra

    def recount(self, committed_extra: int) -> None:
        """:meth:`refresh_uncommitted` after the Time Scheduler's tick, whose pins and uploads
        move free blocks but never a running request's blocks or tokens (its growth stands)."""
        self.uncommitted = self.pool.num_free - self._growth - committed_extra

    def repartition(
        self, now: float, running: Sequence[Request], waiting: Sequence[Request]
    ) -> None:
        imp: dict[str, float] = {}
        waits: dict[str, list[float]] = {}
        used: dict[str, set[int]] = {}
        # Once every adjustment_window steps, over ~1,250 requests: the status by identity (the
        # enum's ``value`` is a property call) and no set update for a request without blocks
        # (every waiting one): 2.4 ms was the slowest call of the schedule benchmark.
        for r in chain(running, waiting):
            m = r.metadata
            if m is None or not m.agent_type:
                continue
            k = m.agent_type
            imp[k] = max(imp.get(k, 0.0), m.importance)
            blocks = used.get(k)
            if blocks is None:
                blocks = used[k] = set()
            if r.block_ids:
                blocks.update(r.block_ids)
            if r.status is _WAITING:
                waits.setdefault(k, []).append(max(0.0, now - r.arrival_time))
        tscores = {}
        for k in imp:
            w = waits.get(k, [])
            tscores[k] = self.history.score(k, imp[k], sum(w) / len(w) if w else 0.0, len(w))
        usage = self.pool.num_used / max(1, self.pool.capacity)
        self.plan = partition(self.cfg, self.pool.capacity, usage, self.plan.ratio if self.plan else None,
                              tscores, imp, {k: len(v) for k, v in used.items()})  # fmt: skip

    # ---- admission (§4.4, §4.5) ---------------------------------------------------------------
    def _availability(self) -> tuple[int, dict[str, int]]:
        plan = self.plan
        assert plan is not None
        shared = max(0, plan.shared - self.used.get(None, 0))
        res = {k: max(0, v - self.used.get(k, 0)) for k, v in plan.reserved.items()}
        excess = shared + sum(res.values()) - max(0, self.uncommitted)
        if excess > 0:
            take = min(shared, excess)
            shared -= take
            excess -= take
            for k in sorted(res, key=lambda k: (plan.scores.get(k, 0.0), k)):
                if excess <= 0:
                    break
                take = min(res[k], excess)
                res[k] -= take
                excess -= take
        return shared, res

    def consumption(self, r: Request, demand: int, second_pass: bool) -> Charge | None:
        """Which pools pay for ``demand`` blocks of ``r`` (None: the reservations say no)."""
        if demand <= 0:
            return []
        plan = self.plan
        assert plan is not None
        shared, res = self._availability()
        m = r.metadata
        key = m.type_key if m is not None else None
        out: Charge = []
        take = min(demand, shared)
        if take:
            out.append((None, take))
        rem = demand - take
        if rem and key is not None and key in res:
            take = min(rem, res[key])
            if take:
                out.append((key, take))
            rem -= take
        if rem and key is not None:
            eff = self.effective(r)
            margin = self.cfg.priority_borrow_score_margin
            donors = sorted((k for k in res if k != key and res[k] > 0),
                            key=lambda k: (-res[k], -plan.scores.get(k, 0.0), k))  # fmt: skip
            for d in donors:
                # A critical donor with waiting requests lends only in the second pass, or
                # early to a requester leading its best waiting score by the margin.
                early = margin > 0 and eff >= self.best_waiting.get(d, 0) + margin
                if d in self.best_waiting and not second_pass and not early:
                    continue
                take = min(rem, res[d])
                out.append((d, take))
                rem -= take
                if not rem:
                    break
        return out if rem == 0 else None

    def check(
        self, r: Request, chunk_blocks: int, has_running: bool, second_pass: bool
    ) -> Denial | None:
        """Admission decision for ``r`` (its prefix hit already applied). On success the charge
        is remembered for :meth:`commit`."""
        g = self.guard.get(r.request_id)
        if g is not None and has_running and self.pool.num_free <= g[0] and self.epoch == g[1]:
            self._count(Denial.RESUME_GUARD.value)
            return Denial.RESUME_GUARD
        full = -(-self.admission_tokens(r) // self.pool.block_size) - len(r.block_ids)
        demand = max(chunk_blocks, full)
        # Cached blocks this request just revived by its prefix hit left the free count after
        # ``uncommitted`` was computed; shared ones (held by running requests too) did not.
        revived = sum(1 for b in r.block_ids if self.pool.ref_count(b) == 1)
        if demand + revived > self.uncommitted:
            self._count(Denial.GENERATION_CAPACITY.value)
            return Denial.GENERATION_CAPACITY
        charge = self.consumption(r, demand, second_pass)
        if charge is None:
            self._count(Denial.RESERVATION.value)
            m = r.metadata
            if m is not None and m.type_key:
                self.history.on_defer(m.type_key)
            return Denial.RESERVATION
        self._pending_charge = (r.request_id, charge, demand + revived)
        return None

    def commit(self, r: Request, now: float, second_pass: bool) -> None:
        """``r`` was admitted: book its charge and its whole remaining growth."""
        rid, charge, demand = self._pending_charge
        assert rid == r.request_id
        self.charges[rid] = charge
        for k, n in charge:
            self.used[k] = self.used.get(k, 0) + n
        self.uncommitted -= demand
        self.guard.pop(rid, None)
        self._count("admitted")
        if second_pass:
            self._count("work_conserving_admitted")
        m = r.metadata
        if m is not None and m.type_key:
            self.history.on_admit(m.type_key, r, m, now)
            if self.plan is not None and m.type_key in self.plan.reserved:
                self._count("critical_admitted")

    def release(self, r: Request) -> None:
        """``r`` left the running set (finished or preempted): drop its charge."""
        for k, n in self.charges.pop(r.request_id, []):
            self.used[k] = self.used.get(k, 0) - n
            if self.used[k] <= 0:
                del self.used[k]

    def on_finished(self, r: Request, now: float) -> None:
        self.release(r)
        self.epoch += 1
        self.guard.pop(r.request_id, None)
        self.forget(r)
        m = r.metadata
        if m is not None and m.type_key:
            self.history.on_finish(m.type_key, r, now)

    def on_preempted(self, r: Request) -> None:
        self.release(r)
        self.guard[r.request_id] = (self.pool.num_free, self.epoch)
        self._count("preempted")
        m = r.metadata
        if m is not None and m.type_key:
            self.history.on_preempt(m.type_key)

    # ---- victims (§4.8) -----------------------------------------------------------------------
    def victim(self, running: Sequence[Request], needy: Request, needed: int, now: float,
               restorable_tokens: dict[str, int] | None = None,
               restore_s: dict[str, float] | None = None) -> Request | None | bool:  # fmt: skip
        """Tokencake's victim among annotated running requests; ``False`` means "no opinion,
        use the native rule" (unannotated requester or no annotated candidate).

        Within the lowest score band, near-finish requests last, then the least recompute per
        freed block. With ``restore_s`` (seconds to bring each request's KV back, from
        ``scheduling.victim_by_restore_time``): when some candidate alone frees ``needed``
        blocks, the one with the cheapest restore among those; otherwise the cheapest restore
        per freed block."""
        if needy.metadata is None:
            return False
        ann = [r for r in running if r.metadata is not None]
        if not ann:
            return False
        sc = {}
        for r in ann:
            frozen = self.score_of(r)
            sc[r.request_id] = frozen.eff if frozen is not None else self.own_score(r, now)
        low = min(sc.values())
        cands = [r for r in ann if sc[r.request_id] <= low + self.cfg.preemption_score_band]
        released = {
            r.request_id: sum(1 for b in r.block_ids if self.pool.ref_count(b) == 1) for r in cands
        }
        others = [r for r in cands if r is not needy]
        narrowed = [r for r in others if released[r.request_id] >= needed]
        sufficient = bool(narrowed)
        if not narrowed:
            narrowed = [r for r in cands if released[r.request_id] > 0]
        if not narrowed:
            return False
        restorable = restorable_tokens or {}
        nf = self.cfg.near_finish_fraction

        def key(r: Request) -> tuple:
            rel = released[r.request_id]
            near = len(r.output_token_ids) >= nf * r.max_tokens
            tie = (sc[r.request_id], -r.arrival_time, r.request_id)
            if restore_s is not None:
                t = restore_s.get(r.request_id, 0.0)
                return (near, t if sufficient else t / rel, -rel, tie)
            recompute = max(0, r.num_computed_tokens - restorable.get(r.request_id, 0))
            return (near, recompute / rel, recompute, -rel, tie)

        v = min(narrowed, key=key)
        return None if v is needy else v
