"""Program-level FCFS (Continuum's admission order, and Tokencake's ``application-fcfs``), kept
cheap for a long queue (issue 17 item 4).

Each request's key is fixed (its metadata and arrival do not change) and unique (it ends with
the request id), so the order is a total order: sorting gives the same result from any
starting order. :class:`SortedQueue` caches the keys and starts each step's sort from the
previous step's order (requests still queued, newcomers appended), which Python's sort
finishes in nearly linear time, instead of calling a Python key function on the whole queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tokencake.scheduler.request import Request


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


class SortedQueue:
    """``sorted(queue, key=key)`` step after step, for a fixed key that is a total order."""

    def __init__(self, key: Callable[[Request], Any] = app_fcfs_key) -> None:
        self.key = key
        self._keys: dict[Request, Any] = {}
        self._prev: list[Request] = []

    def order(self, queue: Sequence[Request]) -> list[Request]:
        cur = set(queue)
        if len(cur) != len(queue):  # a request twice: not a queue this class knows
            return sorted(queue, key=self.key)
        keys = self._keys
        out = list(filter(cur.__contains__, self._prev))
        if len(out) < len(cur):
            new = cur.difference(out)
            for r in new:
                if r not in keys:
                    keys[r] = self.key(r)
            out.extend(new)
        if len(keys) > 2 * len(cur) + 64:  # forget requests that left (amortized)
            self._keys = keys = {r: keys[r] for r in out}
        out.sort(key=keys.__getitem__)
        self._prev = out
        return list(out)
