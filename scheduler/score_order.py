"""The Space Scheduler's admission order, kept between score refreshes (issue 17 item 4).

Scores are frozen between refreshes (``score_refresh_s``), and the order's key
``(-effective, -own, arrival, id)`` is a total order (request ids are unique among live
requests), so between two refreshes a queued request never changes place relative to another:
:class:`ScoreOrder` is a :class:`~tokencake.scheduler.queue_order.KeptOrder` over that key
(departed requests leave the order, each newcomer is inserted by binary search), instead of
sorting the whole queue of a thousand requests at every step. The full sort (``np.lexsort``
over the score table's columns) runs only at a refresh, after a score was set by hand, or
after the queue held a request the order cannot rank (an ordinary request without a score,
which the caller orders behind its barrier).

The same bookkeeping tells the scorer which requests are new since the last step, so it needs
no set of scored requests (rebuilt at every refresh) to find them.

``tests/test_schedule_cost.py`` checks the order against a full sort of the queue at every
step, on random queues that grow, get admitted, preempted and finished.
"""

from __future__ import annotations

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
        self._rows = np.zeros(0, np.int64)  # the ordered requests' score-table rows
        self._forgotten: set[Request] = set()  # members since the last sync that lost their row
        super().__init__(self._key)

    def invalidate(self) -> None:
        super().invalidate()
        self._rows = np.zeros(0, np.int64)

    def departed(self, gone: set[Request], keep: np.ndarray) -> None:
        self._rows = self._rows[keep]

    def inserted(self, i: int, r: Request) -> None:
        self._rows = np.insert(self._rows, i, self.table.row[r])

    def synced(self) -> tuple[list[Request], np.ndarray]:
        """After :meth:`sync`: the requests that stayed queued, in order, and their rows."""
        return self._ranked, self._rows

    def forget(self, r: Request) -> None:
        """``r`` lost its score-table row (it left the engine, usually after it left the queue:
        admitted, then finished). Still queued at the next sync, the order could not key it."""
        if r in self._members:
            self._forgotten.add(r)

    def sync(self, queue: Sequence[Request]) -> list[Request] | None:
        if self._forgotten:
            if not self._forgotten.isdisjoint(queue):
                self.invalidate()
            self._forgotten.clear()
        return super().sync(queue)

    def update(self, queue: Sequence[Request]) -> list[Request] | None:
        if self._forgotten:
            self._queue = None  # no shortcut: the sync checks them
        return super().update(queue)

    def _key(self, r: Request) -> tuple[int, int, float, str]:
        """``r``'s place: the sort key of :meth:`sort`, read from its score-table row."""
        t = self.table
        i = t.row[r]
        return (-int(t.eff[i]), -int(t.own[i]), float(t.arrival[i]), t.rid[i])

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
    ) -> list[Request]:
        """``reqs`` (every request scored; ``rows`` their score-table rows) sorted by
        ``(-effective, -own, arrival, id)``, kept for the next steps as the order of ``queue``
        (default ``reqs``; the same requests in another order; ``members``: its set, when at
        hand)."""
        t = self.table
        idx = np.lexsort((t.rid[rows], t.arrival[rows], -t.own[rows], -t.eff[rows]))  # last key 1st
        ranked = [reqs[i] for i in idx.tolist()]
        self.reset(ranked, reqs if queue is None else queue, members)
        if self.valid:
            self._rows = rows[idx]
        return ranked
