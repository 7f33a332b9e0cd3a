"""A least-recently-used map bounded by bytes and by idle time.

Per-agent-type and per-tool-kind caches are keyed by client strings. An entry count alone does
not bound memory (4,096 keys of several MiB each is gigabytes), so every entry is charged the
size of its key strings plus a fixed overhead for the value and the bookkeeping, and the
oldest entries go once the total passes ``max_bytes``. Entries untouched for ``ttl_s`` expire
(an agent type that stopped appearing does not keep shaping decisions forever).
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ENTRY_OVERHEAD_BYTES = 512  # dict slot, the value object and its fields, the (value, time) pair


def key_bytes(key: object) -> int:
    """Approximate bytes a key holds: its strings' sizes (recursively through tuples)."""
    if isinstance(key, str):
        return sys.getsizeof(key)
    if isinstance(key, tuple):
        return sys.getsizeof(key) + sum(key_bytes(k) for k in key)
    return sys.getsizeof(key)


class ByteLRU(Generic[K, V]):
    """``OrderedDict``-backed LRU; ``now`` is the caller's clock (the scheduler's, so tests and
    the simulator drive expiry deterministically)."""

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float = math.inf,
        max_entries: int | None = None,
        entry_bytes: Callable[[K], int] = key_bytes,
    ) -> None:
        if max_bytes < ENTRY_OVERHEAD_BYTES:
            raise ValueError(f"max_bytes must be >= {ENTRY_OVERHEAD_BYTES}, got {max_bytes}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entry_bytes = entry_bytes
        self._data: OrderedDict[K, tuple[V, float, int]] = OrderedDict()  # value, touched, size
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def get(self, key: K, now: float) -> V | None:
        """The value (refreshing its recency and idle time), or None."""
        item = self._data.get(key)
        if item is None:
            return None
        if now - item[1] >= self.ttl_s:
            self.pop(key)
            return None
        self._data[key] = (item[0], now, item[2])
        self._data.move_to_end(key)
        return item[0]

    def peek(self, key: K) -> V | None:
        """The value without touching recency (for reports and tests)."""
        item = self._data.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V, now: float) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self.nbytes -= old[2]
        size = self._entry_bytes(key) + ENTRY_OVERHEAD_BYTES
        self._data[key] = (value, now, size)
        self.nbytes += size
        self._evict()

    def pop(self, key: K) -> V | None:
        old = self._data.pop(key, None)
        if old is None:
            return None
        self.nbytes -= old[2]
        return old[0]

    def expire(self, now: float) -> int:
        """Drop entries idle for ``ttl_s`` or more; returns how many went. Recency order is
        touch order, so only the oldest entries need looking at."""
        n = 0
        while self._data:
            key, (_, touched, _) = next(iter(self._data.items()))
            if now - touched < self.ttl_s:
                break
            self.pop(key)
            n += 1
        return n

    def _evict(self) -> None:
        while self._data and (
            self.nbytes > self.max_bytes
            or (self.max_entries is not None and len(self._data) > self.max_entries)
        ):
            key = next(iter(self._data))
            self.pop(key)
