"""Admission orders kept from step to step instead of sorted again (issue 17 item 4).

An order whose key is a total order (it ends with the request id, unique among live requests)
and does not change while a request is queued is the same whatever order the queue is in, so a
step's order is the last step's order without the requests that left the queue, with each
newcomer inserted by binary search on its key. :class:`KeptOrder` does that bookkeeping: the
departed and the newcomers come from the core's queue log (``waiting_queue.py``: a step's
changes, no pass over the queue), or, for a queue without one, from a set difference and a
scan from the queue's end (newcomers join a queue at its end); then a binary search
(``bisect``) per newcomer. A step that admits a few requests and gains a few costs work in
the number of changes (or a few C-level passes over a thousand requests without the log), not
a sort with a Python key per request.

Users: program-level FCFS (:class:`SortedQueue`: Continuum's admission order, and Tokencake's
``application-fcfs``) and the Space Scheduler's score order
(:class:`~tokencake.scheduler.score_order.ScoreOrder`, valid between score refreshes).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import compress
from typing import Any

from tokencake.scheduler.request import Request
from tokencake.scheduler.waiting_queue import Mark, WaitingQueue, net_changes


def app_fcfs_key(r: Request) -> tuple[float, float, str]:
    """By the start of the request's application (its own arrival when it carries none), then
    arrival, then id."""
    m = r.metadata
    start = (
        m.application_started_at_s if m is not None and m.application_started_at_s > 0 else math.inf
    )
    return (min(start, r.arrival_time), r.arrival_time, r.request_id)


def application_fcfs(waiting: Sequence[Request]) -> list[Request]:
    """Program-level FCFS order of ``waiting``, from scratch."""
    return sorted(waiting, key=app_fcfs_key)


def delete_positions(items: list[Any], pos: list[int]) -> list[Any]:
    """``items`` without the entries at ``pos`` (ascending): a few are deleted in place
    (memmoves), many by one pass that builds a new list."""
    if len(pos) <= 8:
        for i in reversed(pos):
            del items[i]
        return items
    keep = [True] * len(items)
    for i in pos:
        keep[i] = False
    return list(compress(items, keep))


class KeptOrder:
    """A queue's order by a fixed total-order key, kept between steps.

    :meth:`sync` makes the order's members the queue's (departed requests leave it) and returns
    the newcomers; :meth:`place` inserts them. :meth:`update` does both and returns the order.
    A caller whose keys may change calls :meth:`invalidate`; without a valid order (also after
    a queue holding a request twice, or a :meth:`sync` not followed by its :meth:`place`)
    :meth:`update` returns None and the caller sorts, then hands the result to :meth:`reset`.
    """

    def __init__(self, key: Callable[[Request], Any]) -> None:
        self.key = key
        self.valid = False
        self.full_sorts = 0  # how often the caller sorted from scratch (tests, observers)
        self._ranked: list[Request] = []
        self._members: set[Request] = set()
        self._queue: list[Request] | None = None  # the queue as of the last completed update
        self._pending: list[Request] | None = None  # synced newcomers not placed yet
        # A logged queue whose members are ours as of ``_mark`` (its changes since then are
        # the next sync's; without them the sync compares the queue with the members).
        self._logged: WaitingQueue | None = None
        self._mark: Mark | None = None

    def invalidate(self) -> None:
        """The next order is a full sort (a key changed, or the order cannot rank a request)."""
        self.valid = False
        self._ranked = []
        self._members = set()
        self._queue = self._pending = None
        self._logged = self._mark = None

    def reset(
        self, ranked: list[Request], queue: Sequence[Request], members: set[Request] | None = None
    ) -> None:
        """``ranked`` is ``queue`` sorted from scratch (``members``: ``set(queue)``, when at
        hand): keep it."""
        self.invalidate()
        self.full_sorts += 1
        members = set(queue) if members is None else members
        if len(members) == len(ranked) == len(queue):  # a request twice is no queue we keep
            self._ranked, self._members = list(ranked), members
            self._remember(queue)
            self.valid = True

    def _remember(self, queue: Sequence[Request]) -> None:
        """The members are ``queue``'s now: a later :meth:`update` with the same queue, unchanged,
        returns the order as it is, and a later :meth:`sync` reads a logged queue's changes."""
        if isinstance(queue, WaitingQueue):
            self._logged, self._mark, self._queue = queue, queue.mark(), queue
        else:
            self._logged = self._mark = None
            self._queue = list(queue)

    def _changes(self, queue: Sequence[Request]) -> tuple[list[Request], list[Request]] | None:
        """``(departed, newcomers)`` since the members were ``queue``'s, from its log; None when
        it has none for us (a plain list, another queue, a change the log does not describe)."""
        if queue is not self._logged or self._logged is None:
            return None
        changes = self._logged.since(self._mark)
        return None if changes is None else net_changes(changes)

    def sync(self, queue: Sequence[Request]) -> list[Request] | None:
        """Make the order's members ``queue``'s: the departed leave it (:meth:`departed` is
        told); the newcomers are returned in queue order, to be :meth:`place` d. None: no
        valid order."""
        if self._pending is not None:  # the last sync was not placed (a fault in between)
            self.invalidate()
        if not self.valid:
            return None
        members = self._members
        logged = self._changes(queue)
        if logged is not None:
            gone = set(logged[0])
            if not gone <= members:  # only a queue holding a request twice does that
                self.invalidate()
                return None
        else:
            # The departed, by one C-level pass that hashes requests by identity; the members
            # set is then kept up to date by the changes alone, not rebuilt from the queue.
            gone = members.difference(queue)
        if gone:
            pos = self.positions(gone)
            self._ranked = delete_positions(self._ranked, pos)
            self.departed(gone, pos)
            members.difference_update(gone)
        missing = len(queue) - len(members)  # the newcomers, unless the queue repeats one
        new: list[Request] = []
        if logged is not None:
            new = logged[1]
            members.update(new)
        elif missing > 0:
            # Newcomers join a queue at its end: scan from there, stop once all are found.
            for r in reversed(queue):
                if r not in members:
                    new.append(r)
                    if len(new) == missing:
                        break
            new.reverse()
            members.update(new)
        if len(members) != len(queue):  # a request twice is no queue we keep
            self.invalidate()
            return None
        self._queue = None
        self._pending = new
        if logged is not None:  # the members are the queue's as of now
            self._mark = self._logged.mark()
        else:
            self._logged = self._mark = None
        return new

    def positions(self, gone: set[Request]) -> list[int]:
        """Where the departed ``gone`` are in the order, ascending."""
        ranked = self._ranked
        if len(gone) <= 8:  # a few: scans that stop at them
            return sorted(map(ranked.index, gone))
        return [i for i, r in enumerate(ranked) if r in gone]

    def departed(self, gone: set[Request], pos: list[int]) -> None:
        """Hook: ``gone`` left the queue, from positions ``pos`` (ascending) of the order as it
        was before."""

    def inserted(self, i: int, r: Request) -> None:
        """Hook: newcomer ``r`` was inserted at position ``i`` of the order."""

    def placeable(self, new: list[Request]) -> bool:
        """Hook: whether the order can rank every one of ``new``."""
        return True

    def place(self, queue: Sequence[Request], new: list[Request]) -> bool:
        """Insert the synced newcomers ``new`` of ``queue`` by their keys; False (and the order
        invalid) when :meth:`placeable` says it cannot rank one."""
        if not self.placeable(new):
            self.invalidate()
            return False
        key, ranked = self.key, self._ranked
        for r in new:
            i = bisect_right(ranked, key(r), key=key)
            ranked.insert(i, r)
            self.inserted(i, r)
        self._pending = None
        self._remember(queue)
        return True

    def update(self, queue: Sequence[Request]) -> list[Request] | None:
        """``queue`` in order from the kept order, or None when there is none. A queue equal
        to the last one (unchanged since, by its log; else one C-level list comparison) returns
        the order as it is."""
        if not (self.valid and self._pending is None and self._unchanged(queue)):
            new = self.sync(queue)
            if new is None or not self.place(queue, new):
                return None
        return list(self._ranked)

    def _unchanged(self, queue: Sequence[Request]) -> bool:
        """``queue`` is the one of the last completed update, as it was then."""
        if self._queue is None:
            return False
        if self._queue is queue and self._logged is queue:
            changes = self._logged.since(self._mark)
            return changes is not None and not changes[0]
        return not isinstance(self._queue, WaitingQueue) and self._queue == queue


class SortedQueue(KeptOrder):
    """``sorted(queue, key=key)`` step after step, for a fixed key that is a total order; each
    request's key is computed once, while it is queued."""

    def __init__(self, key: Callable[[Request], Any] = app_fcfs_key) -> None:
        self._keys: dict[Request, Any] = {}
        self._key = key
        super().__init__(self._cached)

    def _cached(self, r: Request) -> Any:
        k = self._keys.get(r)
        if k is None:
            k = self._keys[r] = self._key(r)
        return k

    def departed(self, gone: set[Request], pos: list[int]) -> None:
        for r in gone:
            self._keys.pop(r, None)

    def order(self, queue: Sequence[Request]) -> list[Request]:
        """``queue`` sorted by the key."""
        out = self.update(queue)
        if out is None:
            self._keys = {}
            out = sorted(queue, key=self._cached)
            self.reset(out, queue)
        return out
