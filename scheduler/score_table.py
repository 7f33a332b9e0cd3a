"""The Space Scheduler's per-request score inputs, as numpy columns (issue 17 item 4).

The hybrid score of every waiting request is refreshed every ``score_refresh_s``; with a
thousand queued requests a Python loop over the scalar score took several milliseconds, the
p90 of ``schedule()``. Each request's time-independent parts (``static_parts``) are computed
once, when it is first seen, and kept in a row here, so a refresh is one vectorized expression
over the rows it needs.

:meth:`ScoreTable.own_scores` repeats ``agent_scores.time_parts`` and the ``int()`` of
``request_score`` operation by operation in float64 (IEEE arithmetic rounds each operation the
same way in numpy and in Python), so each score is the scalar one exactly; a result that is
not finite or too large for int64 makes it return None and the caller uses the scalar path,
which raises for the request at fault. Validated metadata never gets there.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.request import Request
from tokencake.scheduler.tie_rank import TieRank

_INT_LIMIT = 2.0**62  # int64 holds the truncated score, its negation and a group max


class Interner:
    """Small integer ids for hashable keys (join groups, agent types), reference counted so
    ids of keys no live row uses are recycled (a long-running server sees unboundedly many)."""

    def __init__(self) -> None:
        self.ids: dict[Hashable, int] = {}
        self.keys: list[Hashable] = []
        self._refs: list[int] = []
        self._free: list[int] = []

    def acquire(self, key: Hashable) -> int:
        i = self.ids.get(key)
        if i is None:
            if self._free:
                i = self._free.pop()
                self.keys[i] = key
                self._refs[i] = 0
            else:
                i = len(self.keys)
                self.keys.append(key)
                self._refs.append(0)
            self.ids[key] = i
        self._refs[i] += 1
        return i

    def release(self, i: int) -> None:
        self._refs[i] -= 1
        if self._refs[i] == 0:
            del self.ids[self.keys[i]]
            self.keys[i] = None
            self._free.append(i)


class ScoreTable:
    """One row per request the Space Scheduler has seen (annotated or not), until it finishes.

    Columns: ``ann`` (carries metadata), the static score parts (``static``, ``rr``: remaining-
    depth ratio, ``pg``: progress; ``age_f`` and ``queue_f``: the score's two factors of
    ``rr``), the metadata's ``elapsed`` and ``started`` application times,
    the request's ``arrival``, its join ``group`` id and agent ``type`` id (-1: none), and the
    scores it holds until the next refresh: ``own`` and ``eff`` (effective), valid where
    ``scored``; ``tie`` is a label that orders rows by ``(arrival, id)`` (``tie_rank.py``), the
    admission order's last key; ``req`` holds the request itself (an object column: a sorted
    order of rows becomes its list of requests by one fancy index, no Python call per row);
    ``queued`` marks the rows of the Space Scheduler's kept admission order (``score_order.py``
    sets and clears it; a dropped row loses its mark). Rows ``[used:]`` have never been
    given out."""

    _FLOAT = ("static", "rr", "pg", "elapsed", "started", "arrival", "age_f", "queue_f")

    def __init__(self, capacity: int = 256) -> None:
        self.row: dict[Request, int] = {}
        self.ties = TieRank()
        self.groups = Interner()
        self.types = Interner()
        self._free: list[int] = []
        self._used = 0
        self._unstarted = 0  # live annotated rows without an application start time
        self.plain = 0  # live rows without metadata (0: every live request is annotated)
        self._alloc(capacity)

    def _alloc(self, n: int) -> None:
        def grow(old: np.ndarray | None, fill: object, dtype: type) -> np.ndarray:
            a = np.full(n, fill, dtype)
            if old is not None:
                a[: len(old)] = old
            return a

        # The float columns are the rows of one 2-D array: a refresh gathers all of them for
        # its rows by one fancy index (each numpy call costs ~10 us inside a step).
        old = getattr(self, "floats", None)
        self.floats = np.zeros((len(self._FLOAT), n), np.float64)
        if old is not None:
            self.floats[:, : old.shape[1]] = old
        for k, name in enumerate(self._FLOAT):
            setattr(self, name, self.floats[k])
        self.ann = grow(getattr(self, "ann", None), False, np.bool_)
        self.group = grow(getattr(self, "group", None), -1, np.int64)
        self.type = grow(getattr(self, "type", None), -1, np.int64)
        self.own = grow(getattr(self, "own", None), 0, np.int64)
        self.eff = grow(getattr(self, "eff", None), 0, np.int64)
        self.scored = grow(getattr(self, "scored", None), False, np.bool_)
        self.queued = grow(getattr(self, "queued", None), False, np.bool_)
        self.tie = grow(getattr(self, "tie", None), 0, np.int64)
        self.req = grow(getattr(self, "req", None), None, object)

    def add(
        self,
        r: Request,
        parts: tuple[float, float, float] | None,
        group: Hashable | None,
    ) -> int:
        """A row for ``r``: ``parts`` are its ``static_parts`` (None: no metadata), ``group``
        its join-group key (None: it inherits no group's priority)."""
        if self._free:
            i = self._free.pop()
        else:
            if self._used == len(self.ann):
                self._alloc(2 * self._used)
            i = self._used
            self._used += 1
        m: AgentMetadata | None = r.metadata
        self.arrival[i] = r.arrival_time
        self.ties.add((r.arrival_time, r.request_id), i, self.tie)
        self.own[i] = self.eff[i] = 0
        self.scored[i] = False
        self.req[i] = r
        if parts is None or m is None:
            self.plain += 1
            self.ann[i] = False
            self.group[i] = self.type[i] = -1
        else:
            self.ann[i] = True
            self.static[i], self.rr[i], self.pg[i] = parts
            rr = parts[1]
            # time_parts()'s two rr factors, each computed as it does (same IEEE operations)
            self.age_f[i], self.queue_f[i] = 1 + 0.75 * rr, 1 + 0.5 * rr
            self.elapsed[i] = m.application_elapsed_s
            self.started[i] = m.application_started_at_s
            if not m.application_started_at_s > 0:
                self._unstarted += 1
            self.group[i] = -1 if group is None else self.groups.acquire(group)
            self.type[i] = self.types.acquire(m.agent_type)
        self.row[r] = i
        return i

    def drop(self, r: Request) -> None:
        """``r`` left the engine: recycle its row and its group and type ids."""
        i = self.row.pop(r, None)
        if i is None:
            return
        self.ties.remove(i)
        if not self.ann[i]:
            self.plain -= 1
        elif not self.started[i] > 0:
            self._unstarted -= 1
        if self.group[i] >= 0:
            self.groups.release(int(self.group[i]))
        if self.type[i] >= 0:
            self.types.release(int(self.type[i]))
        self.ann[i] = self.scored[i] = self.queued[i] = False
        self.group[i] = self.type[i] = -1
        self.req[i] = None  # the table must not keep a finished request alive
        self._free.append(i)

    @property
    def used(self) -> int:
        """Rows ever given out (every live row is below it)."""
        return self._used

    def rows(self, reqs: Sequence[Request]) -> np.ndarray:
        """The rows of ``reqs`` (each must have one), in order."""
        return np.fromiter(map(self.row.__getitem__, reqs), np.int64, len(reqs))

    # Metadata that skipped validation (the hostile-input tests set fields on an accepted
    # AgentMetadata) can overflow here; the finiteness check returns None for it, so numpy's
    # overflow/invalid warnings are only noise in the log.
    @np.errstate(over="ignore", invalid="ignore")
    def own_scores(self, rows: np.ndarray, now: float) -> np.ndarray | None:
        """``request_score`` of the annotated ``rows`` at ``now`` (int64), or None when one is
        not finite or not below 2**62 (then the scalar path decides, and raises)."""
        static, _, pg, elapsed, started, arrival, age_f, queue_f = self.floats[:, rows]
        # time_parts(), step for step: Python's max/min of two finite floats pick the value
        # np.maximum/np.minimum pick, and every + - * rounds identically (a * b is b * a, and
        # a + b is b + a, exactly). In place: each temporary is a buffer for the next step.
        wait = now - arrival
        np.maximum(0.0, wait, out=wait)
        if self._unstarted == 0:  # every row has a start time (the usual case): no np.where
            elapsed = np.maximum(elapsed, now - started)
        else:
            elapsed = np.where(started > 0, np.maximum(elapsed, now - started), elapsed + wait)
        total = np.minimum(elapsed, 300.0)
        total *= age_f  # age = min(elapsed, 300) * (1 + 0.75 * rr)
        total *= 5
        np.minimum(wait, 180.0, out=wait)
        wait *= queue_f  # queue = min(wait, 180) * (1 + 0.5 * rr)
        wait *= 8
        total += wait  # 5 * age + 8 * queue
        np.minimum(elapsed, 240.0, out=elapsed)
        elapsed *= pg  # completion = min(elapsed, 240) * progress
        elapsed *= 5
        total += elapsed  # ... + 5 * completion
        total += static  # static + (...)
        # Not finite or too large: a NaN makes both comparisons False.
        if total.size and not (total.max() < _INT_LIMIT and total.min() > -_INT_LIMIT):
            return None
        return total.astype(np.int64)  # int(): the cast truncates toward zero
