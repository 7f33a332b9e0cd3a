"""The Space Scheduler's per-request scores and the admission order they give (paper digest
§4.2.1, §4.6, §4.7), kept fast for a long queue (issue 17 item 4).

* Scores are frozen for ``score_refresh_s``: a refresh rescored every waiting request (and every
  running one in a join group) from scratch, now one numpy expression over the requests'
  score-table rows (``score_table.py``); between refreshes only newcomers are scored, found by
  set difference rather than a scan of the queue.
* The order sorts the queue by ``(-effective, -own, arrival, id)``, a total order. Each step
  starts the sort from the previous step's order (still-queued requests, newcomers appended),
  which Python's sort finishes in nearly linear time; the result is the same from any start.

``tests/test_space_scoring.py`` checks scores, groups, best waiting scores and the order against
a plain full recomputation on random queues.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from itertools import compress
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.agent_scores import static_parts, time_parts
from tokencake.scheduler.faults import blame
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.partition import PartitionPlan
from tokencake.scheduler.request import Request
from tokencake.scheduler.score_table import ScoreTable
from tokencake.scheduler.tokencake_config import SpaceConfig


class Scored(NamedTuple):
    """A request's own score and its effective one (its join group's maximum)."""

    own: int
    eff: int


# C-level helpers for the hot per-step paths (no Python frame per request).
_RID = attrgetter("request_id")
_ARRIVAL = attrgetter("arrival_time")
_NATIVE = attrgetter("arrival_time", "request_id")
_NONE = np.iinfo(np.int64).min


def _in_order(queue: Sequence[Request], subset: set[Request]) -> list[Request]:
    """The members of ``subset`` in ``queue`` order. Newcomers join a queue at its end, so the
    scan runs from there and stops once all are found."""
    if len(subset) <= 1:
        return list(subset)
    out = []
    for r in reversed(queue):
        if r in subset:
            out.append(r)
            if len(out) == len(subset):
                break
    out.reverse()
    return out


class SpaceScores(abc.ABC):
    """Scores and admission order; the base of :class:`~tokencake.scheduler.space.SpaceScheduler`
    (which sets ``plan`` and ``uncommitted`` and defines ``admission_tokens``)."""

    plan: PartitionPlan | None
    uncommitted: int

    def __init__(self, config: SpaceConfig, pool: BlockPool) -> None:
        self.cfg = config
        self.pool = pool
        # Every scored request's sort key (-effective, -own, arrival, id): the scores themselves
        # (``scores`` is the same by request id, for observers).
        self._scores: dict[Request, tuple[int, int, float, str]] = {}
        self.best_waiting: dict[str, int] = {}  # critical type -> highest waiting effective score
        # Row per seen request: static score parts, group and type ids.
        self.table = ScoreTable()
        self._head: list[Request] = []
        self._groups: dict[tuple[float, str], int] = {}
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
        with blame(r, "the Space Scheduler's score"):
            i = self._row(r)
            static, rr, pg = float(t.static[i]), float(t.rr[i]), float(t.pg[i])
            return int(static + time_parts(m, r.arrival_time, now, rr, pg))

    def _row(self, r: Request) -> int:
        """``r``'s row in the score table, made (static parts computed) on first sight."""
        i = self.table.row.get(r)
        if i is not None:
            return i
        m = r.metadata
        if m is None:
            return self.table.add(r, None, None)
        with blame(r, "the Space Scheduler's score"):
            return self.table.add(r, static_parts(m), self._group_of(m))

    def effective(self, r: Request) -> int:
        """``r``'s effective score this step (0: not scored)."""
        k = self._scores.get(r)
        return -k[0] if k is not None else 0

    def score_of(self, r: Request) -> Scored | None:
        """``r``'s frozen scores, or None when it has none."""
        k = self._scores.get(r)
        return None if k is None else Scored(-k[1], -k[0])

    @property
    def scores(self) -> dict[str, Scored]:
        """Every frozen score by request id (a snapshot for observers and tests)."""
        return {k[3]: Scored(-k[1], -k[0]) for k in self._scores.values()}

    def set_score(self, r: Request, own: int, eff: int) -> None:
        """Give ``r`` these scores (until the next refresh)."""
        self._scores[r] = (-eff, -own, r.arrival_time, r.request_id)
        self.table.eff[self._row(r)] = eff

    def score_step(
        self, now: float, running: Sequence[Request], waiting: Sequence[Request]
    ) -> None:
        """This step's scores: all of them when the refresh is due, else the newcomers'."""
        if now - self._scored_at >= self.cfg.score_refresh_s or self._scored_at > now:
            self._rescore(now, running, waiting)
        else:
            # Between refreshes only newcomers (new or requeued requests) need a score; they
            # inherit their join group's frozen maximum.
            for r in self._unscored(waiting):
                s = self.own_score(r, now)
                g = self._group_of(r.metadata)
                eff = max(s, self._groups.get(g, s)) if g is not None else s
                if g is not None:
                    self._groups[g] = eff
                self.set_score(r, s, eff)
                k = r.metadata.agent_type
                if self.plan is not None and k in self.plan.reserved:
                    self.best_waiting[k] = max(self.best_waiting.get(k, eff), eff)

    def _unscored(self, waiting: Sequence[Request]) -> list[Request]:
        """Annotated requests of ``waiting`` with no score yet, in queue order (every request
        of ``waiting`` gets its score-table row on the way)."""
        new = set(waiting).difference(self._scores)
        row = self.table.row
        for r in _in_order(waiting, {r for r in new if r not in row}):
            self._row(r)
        return _in_order(waiting, {r for r in new if r.metadata is not None})

    def _group_of(self, m: AgentMetadata) -> tuple[float, str] | None:
        if self.cfg.inherit_join_priority and m.join_group and m.application_started_at_s > 0:
            return (m.application_started_at_s, m.join_group)
        return None

    def _rescore(self, now: float, running: Sequence[Request], waiting: Sequence[Request]) -> None:
        """Every waiting request's score and every grouped running one's, from scratch: one
        numpy expression over their score-table rows (``score_table.py``); join groups take
        their members' maximum."""
        self._scored_at = now
        t = self.table
        for reqs in (waiting, running):
            for r in _in_order(reqs, set(reqs).difference(t.row)):
                self._row(r)
        wrows = t.rows(waiting)
        rrows = t.rows(running)
        wsel = t.ann[wrows]
        rsel = t.group[rrows] >= 0  # running scores matter for join groups (victims: lazily)
        reqs = list(compress(waiting, wsel.tolist())) + list(compress(running, rsel.tolist()))
        rows = np.concatenate([wrows[wsel], rrows[rsel]])
        own = t.own_scores(rows, now)
        if own is None:  # unreachable with validated metadata: the scalar path blames someone
            own = np.array([self.own_score(r, now) for r in reqs], np.int64)
        eff = own.copy()
        gid = t.group[rows]
        grouped = gid >= 0
        groups: dict[tuple[float, str], int] = {}
        if grouped.any():
            ids, inv = np.unique(gid[grouped], return_inverse=True)
            best = np.full(len(ids), _NONE, np.int64)
            np.maximum.at(best, inv, own[grouped])
            eff[grouped] = best[inv]
            groups = dict(
                zip(map(t.groups.keys.__getitem__, ids.tolist()), best.tolist(), strict=True)
            )
        t.eff[rows] = eff
        neg_eff, neg_own = (-eff).tolist(), (-own).tolist()
        keys = zip(neg_eff, neg_own, map(_ARRIVAL, reqs), map(_RID, reqs), strict=True)
        self._scores = dict(zip(reqs, keys, strict=True))
        self._groups = groups
        self._best(waiting, wrows)

    def _best(self, waiting: Sequence[Request], rows: np.ndarray | None = None) -> None:
        """Each critical type's highest effective score among the waiting requests (``rows``:
        their score-table rows, when already at hand)."""
        crit = self.plan.critical if self.plan else set()
        t = self.table
        crit_ids = {t.types.ids[k]: k for k in crit if k in t.types.ids}
        best: dict[str, int] = {}
        if crit_ids and waiting:
            rows = t.rows(waiting) if rows is None else rows
            tid = t.type[rows]
            mine = np.isin(tid, list(crit_ids))
            if mine.any():
                top = np.full(len(t.types.keys), _NONE, np.int64)
                np.maximum.at(top, tid[mine], t.eff[rows[mine]])
                best = {k: int(top[i]) for i, k in crit_ids.items() if top[i] > _NONE}
        self.best_waiting = best

    # ---- ordering (§4.6, §4.7) ----------------------------------------------------------------
    def order(self, waiting: Sequence[Request]) -> list[Request]:
        """Native FCFS order, with the annotated prefix before the first ordinary request
        re-sorted by score (the ordinary-request barrier) and, under high committed pressure,
        by active-prefix affinity within 500-point bands."""
        keys = self._scores
        ws = set(waiting)
        if len(ws) == len(waiting) and not ws.difference(keys):
            # Every request is annotated: the barrier is past the end, the whole queue is
            # the head. Sorting the previous order (still queued, newcomers appended) is
            # nearly linear; the keys are unique, so the result is the same from any start.
            head = list(filter(ws.__contains__, self._head))
            if len(head) < len(ws):
                head.extend(ws.difference(head))
            tail: list[Request] = []
        else:
            native = sorted(waiting, key=_NATIVE)
            cut = next((i for i, r in enumerate(native) if r.metadata is None), len(native))
            head, tail = native[:cut], native[cut:]
        head.sort(key=keys.__getitem__)
        self._head = head
        band = self.cfg.cache_affinity_score_band
        cap = self.pool.capacity
        if (band > 0 and self.pool.enable_prefix_cache and head
                and self.uncommitted <= cap * (1 - 0.75)):  # fmt: skip
            head = self._affinity_bands(head, band)
        return head + tail

    def _affinity_bands(self, head: list[Request], band: int) -> list[Request]:
        out: list[Request] = []
        i = 0
        while i < len(head):
            top = -self._scores[head[i]][0]
            j = i
            while j < len(head) and -self._scores[head[j]][0] >= top - band:
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
        shared = sum(1 for b in hits if self.pool.ref_count(b) > 0)
        demand = max(0, -(-self.admission_tokens(r) // bs) - len(hits))
        if shared < demand or shared == 0:
            return (0.0, 0)
        return (shared / (shared + demand), shared)

    def forget(self, r: Request) -> None:
        """``r`` left the engine: drop its row and its score (a later request reusing the id is a
        newcomer)."""
        self._scores.pop(r, None)
        self.table.drop(r)
