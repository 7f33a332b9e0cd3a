"""Host (CPU) block pool: host block ids, reference counts, the host prefix cache and retention.

This is the bookkeeping half of the host KV tier; the arrays live in ``host_kv.py`` and the
copies in ``transfer.py``. Pure Python (the scheduler imports it; no JAX here).

Host block ids are separate from device page ids. Block 0 is a dummy block, like the device's
dummy page: padded transfer slots read from and write to it, so it is never handed out.

Every host block in ``1 .. num_blocks-1`` is in exactly one state:

* **free**: on ``_free``, no hash, ref count 0;
* **cached**: ref count 0, hash registered, not retained: on the LRU, evictable;
* **retained**: ref count 0, hash registered, retention count > 0: *pinned*, never evicted
  (holds an agent's KV across a tool call, or a swapped-out request's KV until it resumes);
* **in use**: ref count >= 1 (a transfer in flight reads or writes it).

Retention is counted per *hash* (the owner of a lifecycle knows hashes, not host ids) and may
overlap with "in use"; a block returns to the LRU only when both counts reach zero.

A block whose copy-in from the device is still in flight is *pending*: its hash is registered
(so a second copy of the same block is not issued) but :meth:`lookup_prefix` stops before it,
because its bytes are not there yet. :meth:`complete_write` publishes it, :meth:`discard` drops
it after a failed copy.

Prefix hashes are the device pool's chained block hashes (``block_pool.block_hashes``), so a
device prefix hit can be extended by a host hit on the following blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

DUMMY_HOST_BLOCK = 0


class HostPoolExhaustedError(RuntimeError):
    """Raised when a host allocation asks for more blocks than can be freed."""


class HostBlockPool:
    """Reference-counted host block allocator with an LRU prefix cache and retention pins."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("HostBlockPool needs num_blocks >= 2 (block 0 is the dummy block)")
        if block_size <= 0:
            raise ValueError("HostBlockPool block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, DUMMY_HOST_BLOCK, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._retain: dict[bytes, int] = {}
        self._pending: set[int] = set()
        self.hits = 0
        self.evictions = 0

    @classmethod
    def for_budget(cls, budget_bytes: int, bytes_per_block: int, block_size: int) -> HostBlockPool:
        """A pool sized to ``budget_bytes`` of host KV (``KVCacheSpec.bytes_per_page`` each);
        the dummy block counts against the budget."""
        return cls(max(2, budget_bytes // bytes_per_block), block_size)

    # ---- capacity -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Usable blocks (excludes the dummy block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks obtainable right now: free plus evictable (cached, unretained) ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_retained(self) -> int:
        """Blocks pinned by retention (in use or not)."""
        return sum(1 for h in self._retain if h in self._block_of)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def hash_of(self, block: int) -> bytes | None:
        return self._hash_of.get(block)

    def block_of(self, h: bytes) -> int | None:
        """Host block holding hash ``h`` (pending or not), or None."""
        return self._block_of.get(h)

    def is_pending(self, block: int) -> bool:
        return block in self._pending

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (ref count 1), evicting unretained LRU blocks if needed.

        Raises :class:`HostPoolExhaustedError` (and changes nothing) when fewer than ``n`` can
        be had; see :meth:`try_allocate` for the graceful variant.
        """
        if n < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        if n > self.num_free:
            raise HostPoolExhaustedError(f"asked for {n} host blocks, only {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._cached.popitem(last=False)
                self._drop_hash(b)
                self.evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def try_allocate(self, n: int) -> list[int] | None:
        """Like :meth:`allocate` but returns None when the pool is short (degrade gracefully)."""
        return self.allocate(n) if n <= self.num_free else None

    def acquire(self, blocks: Sequence[int]) -> None:
        """Add one reference to each hashed or in-use block (e.g. the source of a copy-out to
        the device), taking cached blocks off the LRU so they cannot be evicted meanwhile."""
        for b in blocks:
            if b == DUMMY_HOST_BLOCK or (self._ref[b] == 0 and b not in self._hash_of):
                raise ValueError(f"cannot acquire host block {b}: free or dummy")
            if self._ref[b] == 0:
                self._cached.pop(b, None)
            self._ref[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; hashed blocks become cached (or stay pinned if
        retained), others free. Reverse order so a chain's tail is evicted before its head."""
        for b in reversed(blocks):
            if b == DUMMY_HOST_BLOCK or self._ref[b] <= 0:
                raise ValueError(f"double free or invalid host block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._settle(b)

    def _settle(self, b: int) -> None:
        """Place an unreferenced block: retained -> pinned (off every list), hashed -> LRU
        (newest end), else free."""
        h = self._hash_of.get(b)
        if h is None:
            self._free.append(b)
        elif self._retain.get(h, 0) == 0:
            self._cached[b] = None

    # ---- prefix cache ---------------------------------------------------------------------
    def register(self, block: int, h: bytes, pending: bool = True) -> bool:
        """Record that in-use ``block`` holds (or, while ``pending``, will hold) hash ``h``.

        Returns False (and records nothing) if ``h`` already has a block: the caller should use
        that one and free ``block``.
        """
        if self._ref[block] <= 0:
            raise ValueError(f"cannot register hash for host block {block}: not in use")
        if block in self._hash_of:
            raise ValueError(f"host block {block} already holds a hash")
        if h in self._block_of:
            return False
        self._hash_of[block] = h
        self._block_of[h] = block
        if pending:
            self._pending.add(block)
        return True

    def complete_write(self, blocks: Sequence[int]) -> None:
        """The copy into ``blocks`` finished: make them visible to :meth:`lookup_prefix`."""
        for b in blocks:
            self._pending.discard(b)

    def discard(self, blocks: Sequence[int]) -> None:
        """A copy into ``blocks`` failed: forget their hashes (and any retention on them: the
        data never arrived) and drop the writer's reference. Later :meth:`release` calls for
        those hashes are no-ops."""
        for b in blocks:
            self._pending.discard(b)
            self._drop_hash(b)
        self.free(blocks)

    def lookup_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Longest run of *written* host blocks matching ``hashes`` from the start. Does not
        take references (call :meth:`acquire`)."""
        out = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None or b in self._pending:
                break
            out.append(b)
        self.hits += len(out)
        return out

    def evict_cached(self, n: int | None = None) -> int:
        """Drop up to ``n`` (all if None) unretained cached blocks; returns how many."""
        count = 0
        while self._cached and (n is None or count < n):
            b, _ = self._cached.popitem(last=False)
            self._drop_hash(b)
            self._free.append(b)
            count += 1
        return count

    def _drop_hash(self, b: int) -> None:
        h = self._hash_of.pop(b, None)
        if h is not None and self._block_of.get(h) == b:
            del self._block_of[h]
            self._retain.pop(h, None)

    # ---- retention ------------------------------------------------------------------------
    def retain(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Pin the blocks holding ``hashes`` against eviction (counted; nests). Hashes with no
        host block are skipped; returns the hashes actually retained, which is exactly what
        the caller must later pass to :meth:`release`."""
        out = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                continue
            self._retain[h] = self._retain.get(h, 0) + 1
            if self._ref[b] == 0:
                self._cached.pop(b, None)
            out.append(h)
        return out

    def release(self, hashes: Sequence[bytes]) -> None:
        """Undo one :meth:`retain` per hash; fully released idle blocks rejoin the LRU. Hashes
        whose block was discarded (failed copy) are skipped."""
        for h in hashes:
            if h not in self._block_of:
                continue
            count = self._retain.get(h, 0)
            if count <= 0:
                raise ValueError("release of a host hash that is not retained")
            if count == 1:
                del self._retain[h]
                b = self._block_of[h]
                if self._ref[b] == 0:
                    self._cached[b] = None
            else:
                self._retain[h] = count - 1

    def retain_count(self, h: bytes) -> int:
        return self._retain.get(h, 0)

    # ---- invariants -----------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Assert the pool's invariants; raises AssertionError naming the broken one."""
        free = set(self._free)
        cached = set(self._cached)
        used = {b for b in range(1, self.num_blocks) if self._ref[b] > 0}
        pinned = {
            b for b, h in self._hash_of.items() if self._ref[b] == 0 and self._retain.get(h, 0) > 0
        }
        assert len(free) == len(self._free), "duplicate ids on the free list"
        assert DUMMY_HOST_BLOCK not in free | cached | used | pinned, "dummy host block handed out"
        states = [free, cached, used, pinned]
        for i, a in enumerate(states):
            for b in states[i + 1 :]:
                assert not (a & b), "host block in two states"
        assert sum(map(len, states)) == self.capacity, (
            f"free {len(free)} + cached {len(cached)} + used {len(used)} + pinned {len(pinned)}"
            f" != {self.capacity}"
        )
        assert all(r >= 0 for r in self._ref), "negative ref count"
        assert not any(b in self._hash_of for b in free), "free block with a hash"
        assert all(b in self._hash_of for b in cached), "cached block without hash"
        assert all(self._retain.get(self._hash_of[b], 0) == 0 for b in cached), "retained on LRU"
        assert self._pending <= used, "pending block without a writer reference"
        assert all(h in self._block_of and c > 0 for h, c in self._retain.items()), "stale retain"
        for h, b in self._block_of.items():
            assert self._hash_of.get(b) == h, "hash maps out of sync"
        assert len(self._hash_of) == len(self._block_of), "hash maps out of sync"
