"""The Space Scheduler's admission order, kept between score refreshes (issue 17 item 4).

Scores are frozen between refreshes (``score_refresh_s``), and the order's key
``(-effective, -own, arrival, id)`` is a total order (request ids are unique among live
requests), so between two refreshes a queued request never changes place relative to another:
a step only loses the requests that left the queue and gains the newcomers. :class:`ScoreOrder`
keeps the last order; each step drops the departed requests and inserts each newcomer by
binary search on its key, instead of sorting the whole queue of a thousand requests again.
The full sort (``np.lexsort`` over the score table's columns) runs only at a refresh, after a
score was set by hand, or after the queue held a request the order cannot rank (an ordinary
request without a score, which the caller orders behind its barrier).

The same bookkeeping tells the scorer which requests are new since the last step, so it no
longer keeps a set of scored requests (rebuilt at every refresh) to find them.

``tests/test_schedule_cost.py`` checks the order against a full sort of the queue at every
step, on random queues that grow, get admitted, preempted and finished.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Sequence

import numpy as np

from tokencake.scheduler.request import Request
from tokencake.scheduler.score_table import ScoreTable


class ScoreOrder:
    """The waiting requests (all scored) in admission order, valid until a score changes.

    A step calls :meth:`sync` with the queue (departed requests leave the order, newcomers
    are returned), scores the newcomers, then :meth:`place` s them. :meth:`update` does both
    for a caller that only wants the order; it finds the queue unchanged since the last sync
    with one C-level list comparison."""

    def __init__(self, table: ScoreTable) -> None:
        self.table = table
        self.valid = False
        self._ranked: list[Request] = []
        self._members: set[Request] = set()
        self._queue: list[Request] | None = None  # the queue as of the last completed update
        self._pending: list[Request] | None = None  # synced newcomers not placed yet

    def invalidate(self) -> None:
        """A score changed (refresh, set by hand) or the queue holds an unranked request: the
        next order is a full sort."""
        self.valid = False
        self._ranked = []
        self._members = set()
        self._queue = self._pending = None

    def forget(self, r: Request) -> None:
        """``r`` lost its score-table row; if it is still queued the order cannot key it."""
        if r in self._members:
            self.invalidate()

    def key(self, r: Request) -> tuple[int, int, float, str]:
        """``r``'s place: the sort key of :meth:`sort`, read from its score-table row."""
        t = self.table
        i = t.row[r]
        return (-int(t.eff[i]), -int(t.own[i]), float(t.arrival[i]), t.rid[i])

    def sort(self, queue: Sequence[Request], rows: np.ndarray) -> list[Request]:
        """``queue`` (every request scored; ``rows`` its score-table rows) sorted by
        ``(-effective, -own, arrival, id)``, kept for the next steps."""
        t = self.table
        idx = np.lexsort((t.rid[rows], t.arrival[rows], -t.own[rows], -t.eff[rows]))  # last key 1st
        ranked = [queue[i] for i in idx.tolist()]
        self.invalidate()
        members = set(queue)
        if len(members) == len(ranked):  # a request twice is no queue: no incremental order
            self._ranked, self._members, self._queue = ranked, members, list(queue)
            self.valid = True
        return list(ranked)

    def sync(self, queue: Sequence[Request]) -> list[Request] | None:
        """Make the order's members ``queue``'s: departed requests leave it; the newcomers are
        returned in queue order, to be scored and then :meth:`place` d. None: no valid order
        (the caller scores and sorts from scratch)."""
        if self._pending is not None:  # the last sync was not completed (a fault in between)
            self.invalidate()
        if not self.valid:
            return None
        cur = set(queue)
        if len(cur) != len(queue):
            self.invalidate()
            return None
        members = self._members
        gone = members.difference(cur)
        ranked = self._ranked
        for r in gone:
            ranked.remove(r)
        missing = len(cur) - len(members) + len(gone)
        new: list[Request] = []
        if missing:
            # Newcomers join a queue at its end: scan from there, stop once all are found.
            for r in reversed(queue):
                if r not in members:
                    new.append(r)
                    if len(new) == missing:
                        break
            new.reverse()
        self._members = cur
        self._queue = None
        self._pending = new
        return new

    def place(self, queue: Sequence[Request], new: list[Request]) -> bool:
        """Insert the synced newcomers ``new`` of ``queue`` by their keys; False (and the order
        invalid) when one has no score."""
        t = self.table
        row, scored = t.row, t.scored
        for r in new:
            i = row.get(r)
            if i is None or not scored[i]:
                self.invalidate()
                return False
        key, ranked = self.key, self._ranked
        for r in new:
            insort(ranked, r, key=key)
        self._pending = None
        self._queue = list(queue)
        return True

    def update(self, queue: Sequence[Request]) -> list[Request] | None:
        """``queue`` in admission order from the kept order, or None when there is none (the
        caller sorts from scratch, and :meth:`sort` keeps the result)."""
        if not (self.valid and self._pending is None and self._queue == queue):
            new = self.sync(queue)
            if new is None or not self.place(queue, new):
                return None
        return list(self._ranked)
