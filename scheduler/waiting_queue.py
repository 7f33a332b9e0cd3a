"""The core's waiting queue, with a log of what joined and left it (issue 17 item 4).

Several per-step consumers keep state about the queue of a thousand requests: the kept
admission orders (``queue_order.py``: which requests left, which are new) and the Time
Scheduler's ranking of queued prefixes (which requests it has not seen). Each found a step's
few changes by a pass over the whole queue. :class:`WaitingQueue` is a ``list`` (every reader
iterates, sorts and indexes it as before) whose ``append`` and ``remove`` (the only changes the
core makes) also go to a log; a consumer keeps a :meth:`~WaitingQueue.mark` and reads the
changes since it (:meth:`~WaitingQueue.since`, :func:`net_changes`). Any other change (insert,
slice assignment, sort, ...) is allowed but not logged: it makes every mark stale, and a
consumer with a stale mark (or a plain list) falls back to its pass over the queue.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, SupportsIndex

from tokencake.scheduler.request import Request

Mark = tuple[int, int]  # (epoch, absolute log position)
Changes = tuple[list[Request], bytearray]  # the requests, and for each 1 (joined) or 0 (left)

# Entries kept. Consumers read theirs every step (a few dozen); a burst longer than this makes
# them pass over the queue once. Kept short: the log holds requests (finished ones too) alive,
# and every long-lived object costs the garbage collector's passes.
_LOG_LIMIT = 512
_epochs = itertools.count(1)  # unique across queues: a mark never matches another queue


class WaitingQueue(list[Request]):
    """A list of waiting requests that logs its appends and removes."""

    def __init__(self, items: Iterable[Request] = ()) -> None:
        super().__init__(items)
        self._restart()

    def _restart(self) -> None:
        """Every mark taken so far is stale (a change the log does not describe)."""
        self._epoch = next(_epochs)
        # Two flat logs, no tuple per entry (a tuple is an object the collector tracks).
        self._log: list[Request] = []
        self._joined = bytearray()
        self._base = 0  # absolute position of ``_log[0]``

    def append(self, r: Request) -> None:
        super().append(r)
        self._log.append(r)
        self._joined.append(1)
        if len(self._log) > _LOG_LIMIT:  # drop the older half; marks before it go stale
            half = _LOG_LIMIT // 2
            del self._log[:half], self._joined[:half]
            self._base += half

    def remove(self, r: Request) -> None:
        super().remove(r)
        self._log.append(r)
        self._joined.append(0)

    def mark(self) -> Mark:
        """The queue as it is now, for :meth:`since`."""
        return (self._epoch, self._base + len(self._log))

    def since(self, mark: Mark | None) -> Changes | None:
        """The logged changes after ``mark``, oldest first; None when the log cannot say
        (no mark, one taken before an unlogged change, or older than the log)."""
        if mark is None or mark[0] != self._epoch or mark[1] < self._base:
            return None
        i = mark[1] - self._base
        return self._log[i:], self._joined[i:]

    def __reduce__(self) -> tuple[Any, ...]:
        return (WaitingQueue, (list(self),))

    # Every other change works as on a list and makes the marks stale.
    def insert(self, i: SupportsIndex, r: Request) -> None:
        super().insert(i, r)
        self._restart()

    def extend(self, items: Iterable[Request]) -> None:
        super().extend(items)
        self._restart()

    def pop(self, i: SupportsIndex = -1) -> Request:
        r = super().pop(i)
        self._restart()
        return r

    def clear(self) -> None:
        super().clear()
        self._restart()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        super().sort(*args, **kwargs)
        self._restart()

    def reverse(self) -> None:
        super().reverse()
        self._restart()

    def __setitem__(self, i: Any, v: Any) -> None:
        super().__setitem__(i, v)
        self._restart()

    def __delitem__(self, i: Any) -> None:
        super().__delitem__(i)
        self._restart()

    def __iadd__(self, items: Iterable[Request]) -> WaitingQueue:  # type: ignore[override]
        super().__iadd__(items)
        self._restart()
        return self

    def __imul__(self, n: SupportsIndex) -> WaitingQueue:  # type: ignore[override]
        super().__imul__(n)
        self._restart()
        return self


def net_changes(changes: Changes) -> tuple[list[Request], list[Request]]:
    """``(left, joined)``: the requests ``changes`` took out of the queue and those they put
    in, net (a request that left and came back is in neither). ``joined`` is in queue order:
    requests join at the end, so the survivors are ordered by their last append."""
    net: dict[Request, int] = {}
    for r, joined in zip(*changes, strict=True):
        if joined:
            net[r] = net.pop(r, 0) + 1  # re-inserted: its last append decides its place
        else:
            net[r] = net.get(r, 0) - 1
    left = [r for r, d in net.items() if d < 0]
    joined_ = [r for r, d in net.items() if d > 0]
    return left, joined_
