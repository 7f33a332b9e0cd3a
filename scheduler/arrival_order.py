"""FCFS admission order kept from step to step (issue 17 item 4).

vLLM's order, and every policy's that falls back to it, is ``sorted(queue, key=arrival)``: a
stable sort, so requests that arrived at the same time keep their queue order. Sorting a
thousand requests with a Python key every step cost ~0.3 ms of a ~1 ms step. On the core's
logged queue (``waiting_queue.py``) the order is kept instead: its key ``(arrival, sequence)``,
with a sequence number given in queue order, is a total order equal to the stable sort, because
requests join a queue at its end and leaving never reorders the others. A step applies its
logged changes: a request whose last change left the queue leaves the order, one whose last
change joined it (new, or back at the end) gets the next sequence number and is inserted by
binary search. Without a usable log (a plain list, an unlogged change, a queue holding a
request twice) the order is sorted again from scratch.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from operator import attrgetter

from tokencake.scheduler.request import Request
from tokencake.scheduler.waiting_queue import Changes, Mark, WaitingQueue

_ARRIVAL = attrgetter("arrival_time")


class ArrivalOrder:
    """``sorted(queue, key=arrival_time)``, step after step."""

    def __init__(self) -> None:
        self.full_sorts = 0  # how often the order was sorted from scratch (tests, observers)
        self._ranked: list[Request] = []
        self._keys: dict[Request, tuple[float, int]] = {}  # member -> (arrival, sequence)
        self._seq = 0
        self._queue: WaitingQueue | None = None  # the queue the order is of, as of ``_mark``
        self._mark: Mark | None = None

    def order(self, queue: Sequence[Request]) -> list[Request]:
        """``queue`` sorted by arrival (stable), as a new list."""
        changes = None
        if queue is self._queue and self._queue is not None:
            changes = self._queue.since(self._mark)
        if changes is None or not self._apply(changes, len(queue)):
            self._sort(queue)
        if isinstance(queue, WaitingQueue) and len(self._keys) == len(queue):
            self._queue, self._mark = queue, queue.mark()
        else:  # no log, or a request twice (no key per position): sort again next time
            self._queue = self._mark = None
        return list(self._ranked)

    def _sort(self, queue: Sequence[Request]) -> None:
        self.full_sorts += 1
        self._ranked = sorted(queue, key=_ARRIVAL)
        self._keys = {r: (r.arrival_time, i) for i, r in enumerate(queue)}
        self._seq = len(queue)

    def _apply(self, changes: Changes, size: int) -> bool:
        """The logged ``changes`` applied to the order; False when they do not fit it."""
        reqs, joined = changes
        if not reqs:
            return True
        last: dict[Request, int] = {}  # each request's last change, in the order of those
        for r, j in zip(reqs, joined, strict=True):
            last.pop(r, None)
            last[r] = j
        ranked, keys = self._ranked, self._keys
        key = keys.__getitem__
        for r in last:  # out first: a request back at the end takes a new place
            k = keys.get(r)
            if k is not None:
                i = bisect_left(ranked, k, key=key)
                if i >= len(ranked) or ranked[i] is not r:
                    return False
                del ranked[i]
                del keys[r]
        for r, j in last.items():
            if j:
                k = keys[r] = (r.arrival_time, self._seq)
                self._seq += 1
                ranked.insert(bisect_right(ranked, k, key=key), r)
        return len(ranked) == size
