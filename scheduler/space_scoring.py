"""The Space Scheduler's per-request scores and the admission order they give (paper digest
§4.2.1, §4.6, §4.7), kept fast for a long queue (issue 17 item 4).

* Scores are frozen for ``score_refresh_s``: a refresh rescores every waiting request (and every
  running one in a join group) from scratch, one numpy expression over the requests'
  score-table rows (``score_table.py``); between refreshes only newcomers are scored.
* The scores live in the table's ``own`` / ``eff`` columns (``scored`` says which are valid),
  not in a dict of Python tuples: a refresh writes them with two numpy assignments.
* The order sorts the queue by ``(-effective, -own, arrival, id)``, a total order: one
  ``np.lexsort`` over the table's columns (``(arrival, id)`` as one integer label,
  ``tie_rank.py``) at a refresh;
  between refreshes :class:`~tokencake.scheduler.score_order.ScoreOrder` keeps the order and
  inserts newcomers, and tells the scorer which requests are new.

``tests/test_schedule_cost.py`` checks scores, groups, best waiting scores and the order against
a plain full recomputation on random queues.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Hashable, Sequence
from itertools import compress, repeat
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.agent_scores import static_parts, time_parts
from tokencake.scheduler.faults import RequestFault
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.partition import PartitionPlan
from tokencake.scheduler.request import Request
from tokencake.scheduler.score_order import ScoreOrder
from tokencake.scheduler.score_table import ScoreTable
from tokencake.scheduler.tokencake_config import SpaceConfig


class Scored(NamedTuple):
    """A request's own score and its effective one (its join group's maximum)."""

    own: int
    eff: int


# C-level helpers for the hot per-step paths (no Python frame per request).
_NATIVE = attrgetter("arrival_time", "request_id")
_NONE = np.iinfo(np.int64).min
_STAGE = "the Space Scheduler's score"  # a score fault's stage


class SpaceScores(abc.ABC):
    """Scores and admission order; the base of :class:`~tokencake.scheduler.space.SpaceScheduler`
    (which sets ``plan`` and ``uncommitted`` and defines ``admission_tokens``)."""

    plan: PartitionPlan | None
    uncommitted: int

    def __init__(self, config: SpaceConfig, pool: BlockPool) -> None:
        self.cfg = config
        self.pool = pool
        self.best_waiting: dict[str, int] = {}  # critical type -> highest waiting effective score
        # Row per seen request: static score parts, group and type ids.
        self.table = ScoreTable()
        self._order = ScoreOrder(self.table)  # the last admission order, kept between refreshes
        # Join groups' maxima at the last refresh, by the group ids of then (``_gids``: the
        # interner's key -> id map of then, copied; ids are recycled), and the maxima raised
        # by newcomers since (``_groups``): no dict of every group rebuilt at each refresh.
        self._gbest = np.zeros(0, np.int64)
        self._gids: dict[Hashable, int] = {}
        self._groups: dict[Hashable, int] = {}
        self._scored_at = -math.inf

    @abc.abstractmethod
    def admission_tokens(self, r: Request) -> int:
        """Tokens ``r`` is admitted for (its prefix-cache affinity weighs its demand)."""

    # ---- scores -------------------------------------------------------------------------------
    def own_score(self, r: Request, now: float) -> int:
        """``r``'s hybrid score; any failure is ``r``'s :class:`RequestFault`."""
        m = r.metadata
        if m is None:
            return 0
        t = self.table
        # ``with blame(r, _STAGE)``, written out: a generator context manager costs a few us
        # per call, and every newcomer passes here and through :meth:`_row`.
        try:
            i = self._row(r)
            static, rr, pg = float(t.static[i]), float(t.rr[i]), float(t.pg[i])
            return int(static + time_parts(m, r.arrival_time, now, rr, pg))
        except RequestFault:
            raise
        except Exception as exc:
            raise RequestFault(r.request_id, _STAGE, exc) from exc

    def _row(self, r: Request) -> int:
        """``r``'s row in the score table, made (static parts computed) on first sight."""
        i = self.table.row.get(r)
        if i is not None:
            return i
        m = r.metadata
        if m is None:
            return self.table.add(r, None, None)
        try:  # ``with blame(r, _STAGE)``, written out (see :meth:`own_score`)
            return self.table.add(r, static_parts(m), self._group_of(m))
        except RequestFault:
            raise
        except Exception as exc:
            raise RequestFault(r.request_id, _STAGE, exc) from exc

    def effective(self, r: Request) -> int:
        """``r``'s effective score this step (0: not scored)."""
        t = self.table
        i = t.row.get(r)
        return int(t.eff[i]) if i is not None and t.scored[i] else 0

    def score_of(self, r: Request) -> Scored | None:
        """``r``'s frozen scores, or None when it has none."""
        t = self.table
        i = t.row.get(r)
        return Scored(int(t.own[i]), int(t.eff[i])) if i is not None and t.scored[i] else None

    @property
    def scores(self) -> dict[str, Scored]:
        """Every frozen score by request id (a snapshot for observers and tests)."""
        t = self.table
        return {r.request_id: Scored(int(t.own[i]), int(t.eff[i]))
                for r, i in t.row.items() if t.scored[i]}  # fmt: skip

    def set_score(self, r: Request, own: int, eff: int) -> None:
        """Give ``r`` these scores (until the next refresh)."""
        self._set(r, own, eff)
        self._order.invalidate()  # an order built on the old score is stale

    def _set(self, r: Request, own: int, eff: int) -> None:
        t = self.table
        i = self._row(r)
        t.own[i], t.eff[i], t.scored[i] = own, eff, True

    def score_step(
        self, now: float, running: Sequence[Request], waiting: Sequence[Request]
    ) -> None:
        """This step's scores: all of them when the refresh is due, else the newcomers'."""
        new = self._order.sync(waiting)  # None: no kept order, find newcomers the slow way
        if now - self._scored_at >= self.cfg.score_refresh_s or self._scored_at > now:
            self._rescore(now, running, waiting, new)
            return
        # Between refreshes only newcomers (new or requeued requests) need a score; they
        # inherit their join group's frozen maximum.
        todo = self._unscored(waiting) if new is None else self._unscored_of(new)
        for r in todo:
            s = self.own_score(r, now)
            g = self._group_of(r.metadata)
            if g is not None:
                top = self._group_max(g)
                eff = s if top is None else max(s, top)
                self._groups[g] = eff
            else:
                eff = s
            self._set(r, s, eff)
            k = r.metadata.agent_type
            if self.plan is not None and k in self.plan.reserved:
                self.best_waiting[k] = max(self.best_waiting.get(k, eff), eff)
        if new is not None:
            self._order.place(waiting, new)

    def _group_max(self, g: Hashable) -> int | None:
        """Join group ``g``'s highest effective score (frozen; None: no member scored)."""
        top = self._groups.get(g)
        if top is None:
            i = self._gids.get(g)
            if i is not None and self._gbest[i] > _NONE:
                top = int(self._gbest[i])
        return top

    @property
    def groups(self) -> dict[Hashable, int]:
        """Every join group's frozen maximum by group key (a snapshot for observers, tests)."""
        best = self._gbest
        out = {g: int(best[i]) for g, i in self._gids.items() if best[i] > _NONE}
        out.update(self._groups)
        return out

    def _unscored_of(self, new: list[Request]) -> list[Request]:
        """The annotated requests of ``new`` (this step's newcomers, in queue order) with no
        score yet; each gets its score-table row. Requests queued at the last step all had a
        score then, and scores are only dropped by a refresh (which scores every queued one)
        or when a request leaves the engine, so the newcomers are the only candidates."""
        t = self.table
        row = t.row
        for r in new:
            if r not in row:
                self._row(r)
        scored = t.scored  # after the rows are made: a growing table replaces its columns
        return [r for r in new if r.metadata is not None and not scored[row[r]]]

    def _unscored(self, waiting: Sequence[Request]) -> list[Request]:
        """Annotated requests of ``waiting`` with no score yet, in queue order (every request
        of ``waiting`` gets its score-table row on the way)."""
        rows = self._rows_of(waiting)
        t = self.table
        todo = t.ann[rows] & ~t.scored[rows]
        return list(compress(waiting, todo.tolist())) if todo.any() else []

    def _rows_of(self, reqs: Sequence[Request]) -> np.ndarray:
        """The score-table rows of ``reqs``, in order; rows are made for requests without one."""
        t = self.table
        rows = np.fromiter(map(t.row.get, reqs, repeat(-1)), np.int64, len(reqs))
        missing = np.flatnonzero(rows < 0)
        for i in missing.tolist():
            rows[i] = self._row(reqs[i])
        return rows

    def _group_of(self, m: AgentMetadata) -> tuple[float, str] | None:
        if self.cfg.inherit_join_priority and m.join_group and m.application_started_at_s > 0:
            return (m.application_started_at_s, m.join_group)
        return None

    def _rescore(
        self,
        now: float,
        running: Sequence[Request],
        waiting: Sequence[Request],
        new: list[Request] | None,
    ) -> None:
        """Every waiting request's score and every grouped running one's, from scratch: one
        numpy expression over their score-table rows (``score_table.py``); join groups take
        their members' maximum. When every waiting request is annotated the admission order
        is sorted here too, once per refresh (:class:`ScoreOrder` keeps it until the next).

        ``new``: the newcomers of this step's :meth:`ScoreOrder.sync` (None: no kept order);
        with a kept order the waiting requests' rows come from it (the order keeps them),
        the newcomers' are made, in queue order, as :meth:`_rows_of` would."""
        self._scored_at = now
        order = self._order
        if new is not None:
            krows = order.synced()
            nrows = list(map(self._row, new))  # made in queue order
            wrows = np.concatenate([krows, np.array(nrows, np.int64)]) if nrows else krows
            members: set[Request] | None = order._members  # set(waiting), from the sync
        else:
            wrows, members = self._rows_of(waiting), None
        order.invalidate()
        t = self.table
        try:  # every running request has its row (admission scored it), unless ...
            rrows = t.rows(running)
        except KeyError:  # ... it was admitted before the policy saw it: make them
            rrows = self._rows_of(running)
        # Whether every waiting request is annotated: surely so when no live row lacks
        # metadata (the table counts them), without two numpy calls (~10 us each in a step).
        wsel = None if t.plain == 0 else t.ann[wrows]
        rrows = rrows[t.group[rrows] >= 0]  # running scores matter for join groups (victims:
        every = wsel is None or bool(wsel.all())  # scored lazily)
        rows = np.concatenate([wrows if every else wrows[wsel], rrows])
        own = t.own_scores(rows, now)
        if own is None:  # unreachable with validated metadata: the scalar path blames someone
            wrows = self._rows_of(waiting)  # in queue order, as ever; ``rows`` follows ``reqs``
            wsel, rrows = t.ann[wrows], self._rows_of(running)
            rsel = t.group[rrows] >= 0
            reqs = [*compress(waiting, wsel.tolist()), *compress(running, rsel.tolist())]
            rows = np.concatenate([wrows if every else wrows[wsel], rrows[rsel]])
            own = np.array([self.own_score(r, now) for r in reqs], np.int64)
        # Each join group's maximum, by group id (ids are small: the interner recycles them),
        # over every row at once: a row without a group holds -1, which reads an extra last
        # entry kept at _NONE, so max(own, best[gid]) is the group's maximum for a member
        # (it is at least its own score) and its own score for the others. No masks.
        gid = t.group[rows]
        k = len(t.groups.keys)
        best = np.full(k + 1, _NONE, np.int64)
        np.maximum.at(best, gid, own)
        best[k] = _NONE
        eff = np.maximum(own, best[gid])
        self._gbest, self._gids = best[:k], dict(t.groups.ids)
        self._groups = {}
        t.scored[:] = False  # a running request outside a join group loses its score (victims:
        t.scored[rows] = True  # scored lazily)
        t.own[rows] = own
        t.eff[rows] = eff
        n = len(wrows)  # with every waiting request annotated, the first n rows are wrows
        self._best(waiting, wrows, eff[:n] if every else None)
        if every:  # no ordinary request: the whole queue is sorted by score
            order.sort(waiting, wrows, waiting, members, (own[:n], eff[:n]))

    def _best(
        self,
        waiting: Sequence[Request],
        rows: np.ndarray | None = None,
        eff: np.ndarray | None = None,
    ) -> None:
        """Each critical type's highest effective score among the waiting requests (``rows``:
        their score-table rows, ``eff``: their effective scores, when already at hand)."""
        crit = self.plan.critical if self.plan else set()
        t = self.table
        crit_ids = {t.types.ids[k]: k for k in crit if k in t.types.ids}
        best: dict[str, int] = {}
        if crit_ids and waiting:
            rows = t.rows(waiting) if rows is None else rows
            # Every type's maximum, critical or not, by one unmasked pass; rows with no type
            # hold -1, which reads the extra last entry (never read back).
            top = np.full(len(t.types.keys) + 1, _NONE, np.int64)
            np.maximum.at(top, t.type[rows], t.eff[rows] if eff is None else eff)
            best = {k: int(top[i]) for i, k in crit_ids.items() if top[i] > _NONE}
        self.best_waiting = best

    # ---- ordering (§4.6, §4.7) ----------------------------------------------------------------
    def order(self, waiting: Sequence[Request]) -> list[Request]:
        """Native FCFS order, with the annotated prefix before the first ordinary request
        re-sorted by score (the ordinary-request barrier) and, under high committed pressure,
        by active-prefix affinity within 500-point bands."""
        t = self.table
        head = self._order.update(waiting)  # every request scored: the kept order, updated
        tail: list[Request] = []
        if head is None:
            rows = self._rows_of(waiting)
            if t.scored[rows].all():
                # Every request is annotated: the barrier is past the end, the whole queue is
                # the head.
                head = self._order.sort(waiting, rows)
            else:
                self._order.invalidate()
                native = sorted(waiting, key=_NATIVE)
                cut = next((i for i, r in enumerate(native) if r.metadata is None), len(native))
                head, tail = native[:cut], native[cut:]
                rows = t.rows(head)
                idx = np.lexsort((t.tie[rows], -t.own[rows], -t.eff[rows]))
                head = [head[i] for i in idx.tolist()]
        band = self.cfg.cache_affinity_score_band
        cap = self.pool.capacity
        if (band > 0 and self.pool.enable_prefix_cache and head
                and self.uncommitted <= cap * (1 - 0.75)):  # fmt: skip
            head = self._affinity_bands(head, t.eff[t.rows(head)].tolist(), band)
        return head + tail if tail else head  # head: a fresh list either way

    def _affinity_bands(self, head: list[Request], eff: list[int], band: int) -> list[Request]:
        """``head`` (sorted, ``eff`` its effective scores) with each run of requests within
        ``band`` points of the run's first re-sorted by active-prefix affinity."""
        out: list[Request] = []
        i = 0
        while i < len(head):
            top = eff[i]
            j = i
            while j < len(head) and eff[j] >= top - band:
                j += 1
            group = head[i:j]
            group.sort(key=lambda r: self._affinity(r), reverse=True)  # stable: ties keep order
            out.extend(group)
            i = j
        return out

    def _affinity(self, r: Request) -> tuple[float, int]:
        bs = self.pool.block_size
        hashes = r.block_hashes(bs)
        hits = self.pool.lookup_prefix(hashes[: (r.num_tokens - 1) // bs])
        if self.cfg.affinity_counts_cached:  # every resident hit, held or merely cached
            shared = len(hits)
        else:
            shared = sum(1 for b in hits if self.pool.ref_count(b) > 0)
        demand = max(0, -(-self.admission_tokens(r) // bs) - len(hits))
        if shared < demand or shared == 0:
            return (0.0, 0)
        return (shared / (shared + demand), shared)

    def forget(self, r: Request) -> None:
        """``r`` left the engine: drop its row and its score (a later request reusing the id is a
        newcomer)."""
        self._order.forget(r)
        self.table.drop(r)
