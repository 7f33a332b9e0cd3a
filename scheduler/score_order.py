"""The Space Scheduler's admission order, kept between score refreshes (issue 17 item 4).

Scores are frozen between refreshes (``score_refresh_s``), and the order's key
``(-effective, -own, arrival, id)`` is a total order (request ids are unique among live
requests), so between two refreshes a queued request never changes place relative to another:
:class:`ScoreOrder` is a :class:`~tokencake.scheduler.queue_order.KeptOrder` over that key
(departed requests leave the order, each newcomer is inserted by binary search), instead of
sorting the whole queue of a thousand requests at every step. The full sort (``np.lexsort``
over the score table's integer columns, ``(arrival, id)`` as one tie label) runs only at a
refresh, after a score was set by hand, or after the queue held a request the order cannot
rank (an ordinary request without a score, which the caller orders behind its barrier).

The same bookkeeping tells the scorer which requests are new since the last step, so it needs
no set of scored requests (rebuilt at every refresh) to find them.

``tests/test_schedule_cost.py`` checks the order against a full sort of the queue at every
step, on random queues that grow, get admitted, preempted and finished.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import numpy as np

from tokencake.scheduler.queue_order import KeptOrder
from tokencake.scheduler.request import Request
from tokencake.scheduler.score_table import ScoreTable


class ScoreOrder(KeptOrder):
    """The waiting requests (all scored) in admission order, valid until a score changes.

    A step calls :meth:`sync` with the queue, scores the newcomers it returns, then
    :meth:`place` s them; :meth:`update` serves a caller that only wants the order."""

    def __init__(self, table: ScoreTable) -> None:
        self.table = table
        # The ordered requests' score-table rows are the table's ``queued`` column, set and
        # cleared by the order's own deletes and inserts (one scalar write each): a refresh
        # reads them by one np.flatnonzero. (A list of the rows in order, kept the same way,
        # cost a conversion each way at every refresh: ~0.1 ms each for 1,000 rows.)
        self._keys: dict[Request, tuple[int, int, float, str]] = {}  # valid while the order is
        self._forgotten: dict[Request, int] = {}  # members that lost their row since the last
        # sync, with the row they had (it finds them in the order)
        super().__init__(self._key)

    def invalidate(self) -> None:
        # Marks are set only while the order is valid (by its inserts and its sort), so an
        # invalid order has none to clear: a refresh invalidates, then its sort invalidates
        # again (reset), and the second pass over the column was for nothing.
        if self.valid:
            self.table.queued[:] = False
        super().invalidate()
        self._keys = {}

    def positions(self, gone: set[Request]) -> list[int]:
        """Found by binary search on their keys (the order is sorted by them, and they are
        unique). While a member has lost its row (it left the engine: no key) the search could
        probe it, so the requests are searched for instead."""
        if self._forgotten:
            return super().positions(gone)
        ranked, key = self._ranked, self.key
        out = []
        for r in gone:
            i = bisect_left(ranked, key(r), key=key)
            out.append(i if i < len(ranked) and ranked[i] is r else ranked.index(r))
        out.sort()
        return out

    def departed(self, gone: set[Request], pos: list[int]) -> None:
        keys = self._keys
        row, queued = self.table.row, self.table.queued
        for r in gone:
            keys.pop(r, None)
            i = row.get(r)
            if i is not None:  # (a request that lost its row lost its mark with it)
                queued[i] = False

    def inserted(self, i: int, r: Request) -> None:
        t = self.table
        t.queued[t.row[r]] = True

    def synced(self) -> np.ndarray:
        """After :meth:`sync`: the score-table rows of the requests that stayed queued.

        In row order, not in the order's: a full sort of them gives the same order from any
        input order, since their keys are distinct, which holds whenever no two live rows
        share ``(arrival, id)`` (request ids are unique in the core); otherwise (a caller that
        reuses ids) in the order's, where a stable sort keeps equal keys as before."""
        t = self.table
        if t.ties.has_equal:
            return t.rows(self._ranked)
        return np.flatnonzero(t.queued[: t.used])

    def forget(self, r: Request) -> None:
        """``r`` lost its score-table row (it left the engine, usually after it left the queue:
        admitted, then finished). Still queued at the next sync, the order could not key it."""
        i = self.table.row.get(r)
        if i is not None and r in self._members:
            self._forgotten[r] = i

    def sync(self, queue: Sequence[Request]) -> list[Request] | None:
        lost = self._forgotten
        if lost and not lost.keys().isdisjoint(queue):
            self.invalidate()
        try:
            return super().sync(queue)
        finally:
            lost.clear()

    def update(self, queue: Sequence[Request]) -> list[Request] | None:
        if self._forgotten:
            self._queue = None  # no shortcut: the sync checks them
        return super().update(queue)

    def _key(self, r: Request) -> tuple[int, int, float, str]:
        """``r``'s place: the sort key of :meth:`sort`, read from its score-table row."""
        k = self._keys.get(r)  # a binary search probes the same middle requests step after step
        if k is None:
            t = self.table
            i = t.row[r]
            # (arrival, id) as they are, not the tie label: a relabel would make a kept key stale
            k = self._keys[r] = (-t.eff.item(i), -t.own.item(i), t.arrival.item(i), r.request_id)
        return k

    def placeable(self, new: list[Request]) -> bool:
        """Every newcomer has a score (an ordinary request has none: no kept order)."""
        t = self.table
        row, scored = t.row, t.scored
        for r in new:
            i = row.get(r)
            if i is None or not scored[i]:
                return False
        return True

    def sort(
        self,
        reqs: Sequence[Request],
        rows: np.ndarray,
        queue: Sequence[Request] | None = None,
        members: set[Request] | None = None,
        scores: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[Request]:
        """``reqs`` (every request scored; ``rows`` their score-table rows) sorted by
        ``(-effective, -own, arrival, id)``, kept for the next steps as the order of ``queue``
        (default ``reqs``; the same requests in another order; ``members``: its set, when at
        hand; ``scores``: the rows' own and effective scores, when at hand)."""
        t = self.table
        own, eff = (t.own[rows], t.eff[rows]) if scores is None else scores
        idx = np.lexsort((t.tie[rows], -own, -eff))  # last key first
        rows = rows[idx]
        ranked = t.req[rows].tolist()  # ``reqs`` in order: each row's request, no Python call
        self.reset(ranked, reqs if queue is None else queue, members)
        if self.valid:
            t.queued[rows] = True
        return ranked
