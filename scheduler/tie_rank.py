"""Integer labels that order requests by ``(arrival, id)`` (issue 17 item 4).

The Space Scheduler's admission order breaks score ties by arrival, then by request id. Sorting
on the id itself (a numpy string column) was the slowest key of the refresh sort; a label per
score-table row that compares like ``(arrival, id)`` makes the sort three integer keys.

:class:`TieRank` keeps the live keys sorted (Python tuples: the id compares exactly as Python
compares strings) with one int64 label each. A new key usually arrives last (the clock only
moves forward), so it takes the last label plus a wide gap; a key that lands between two others
takes the midpoint of their labels, and when two neighbours' labels are adjacent every label is
assigned again, in order (rare: the gap allows ~30 halvings at one place). Equal keys (possible
only when two live requests share an id and an arrival) share a label, so a stable sort keeps
them in input order, as it did with the string key.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

TieKey = tuple[float, str]

_GAP = 1 << 32  # between consecutive labels after a relabel, and for each key added last
_LIMIT = 1 << 62  # labels stay within +-2**62: negating or subtracting one never overflows


class TieRank:
    """The ``(arrival, id)`` keys of the live score-table rows, sorted, with order-preserving
    int64 labels written to the table's ``tie`` column."""

    def __init__(self) -> None:
        self._keys: list[TieKey] = []  # sorted
        self._rows: list[int] = []  # the row of each key
        self._labels: list[int] = []  # each key's label: ascending, equal for equal keys
        self._key_of: dict[int, TieKey] = {}  # row -> its key
        self._equal = 0  # neighbouring pairs of equal keys (0: a relabel needs no comparisons)
        self.relabels = 0  # how often every label was assigned again (tests, observers)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def has_equal(self) -> bool:
        """Whether two ranked rows share a key (then they share a label too)."""
        return self._equal > 0

    def add(self, key: TieKey, row: int, column: np.ndarray) -> None:
        """Rank ``row`` (not ranked yet) by ``key``: its label goes to ``column[row]`` (a
        relabel rewrites the other ranked rows' labels there too)."""
        keys, labels = self._keys, self._labels
        self._key_of[row] = key
        i = bisect_right(keys, key)
        if i and keys[i - 1] == key:
            label = labels[i - 1]  # an equal key: the same label
            self._equal += 1
        elif i == len(keys):
            label = labels[-1] + _GAP if keys else 0
        elif i == 0:
            label = labels[0] - _GAP
        else:
            lo, hi = labels[i - 1], labels[i]
            label = (lo + hi) // 2 if hi - lo >= 2 else None
        keys.insert(i, key)
        self._rows.insert(i, row)
        if label is None or not -_LIMIT < label < _LIMIT:
            labels.insert(i, 0)
            self._relabel(column)
        else:
            labels.insert(i, label)
            column[row] = label

    def remove(self, row: int) -> None:
        """``row`` (ranked) left the table."""
        keys, rows = self._keys, self._rows
        key = self._key_of.pop(row)
        i = bisect_left(keys, key)
        while rows[i] != row:  # among equal keys, find this row's
            i += 1
        if (i and keys[i - 1] == key) or (i + 1 < len(keys) and keys[i + 1] == key):
            self._equal -= 1  # one pair of equal neighbours less
        del keys[i], rows[i], self._labels[i]

    def _relabel(self, column: np.ndarray) -> None:
        """Every label again, ``_GAP`` apart in key order (equal keys keep one label)."""
        self.relabels += 1
        keys = self._keys
        if not self._equal:  # every key distinct: no comparisons (a burst of arrivals relabels)
            new = np.arange(0, len(keys) * _GAP, _GAP, dtype=np.int64)
            column[np.array(self._rows, np.int64)] = new
            self._labels = new.tolist()
            return
        label, labels = 0, []
        for j, k in enumerate(keys):
            if j and k != keys[j - 1]:
                label += _GAP
            labels.append(label)
        self._labels = labels
        column[self._rows] = labels
