"""Device block pool: block ids, reference counts and the hash-chained prefix cache.

Every block id in ``1 .. num_blocks-1`` is in exactly one of three states:

* **free**: on ``_free`` (never hashed, or hash dropped), ref count 0;
* **cached**: ref count 0 but its full-block hash is still registered, so a later request with
  the same prefix can revive it; evicted (hash dropped) only when the pool needs a block and
  the free list is empty;
* **in use**: ref count >= 1 (shared prefix blocks have several owners).

Block 0 is the dummy page (see ``kv_cache.py``) and is never handed out.

Cached blocks are evicted in order of expected reuse, not by recency alone. A caller that
knows better than LRU ranks them: :meth:`demote` marks blocks nobody is expected to reuse (a
finished leaf agent's own tokens: evicted first), :meth:`expect_reuse` marks blocks a known
future request will want at a given time (an agent waiting on a tool: evicted last, latest
expected reuse first, Belady-style). Unranked blocks sit in between in LRU order; a block's
rank is forgotten when it is taken again or evicted. With no caller ranking (Tokencake's
default since the twentieth round, ``offload.reuse_aware_eviction``) this is plain LRU: the
unranked blocks turned out to hold the hottest ones (a preempted request's own), which the
ranking evicted first (``bench/RESULTS.md``).

Prefix hashes are chained: the hash of block ``i`` covers the hash of block ``i-1`` plus this
block's token ids, so equal hashes mean equal whole prefixes, not just equal blocks.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections import OrderedDict
from collections.abc import Sequence

# The dummy page id lives here (kv_cache re-exports it) so that importing the pool, and with
# it the pure-Python scheduler, never loads JAX.
DUMMY_PAGE = 0


class PoolExhaustedError(RuntimeError):
    """Raised when an allocation asks for more blocks than the pool can give."""


def chain_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Hash of one full block given its parent block's hash (None for the first block)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\x00" * 16)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of every *full* block of ``token_ids``."""
    out: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


class BlockPool:
    """Reference-counted allocator of KV blocks with an LRU prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("BlockPool needs num_blocks >= 2 (block 0 is the dummy page)")
        if block_size <= 0:
            raise ValueError("BlockPool block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, DUMMY_PAGE, -1))  # pop() gives 1 first
        # The cached blocks, in three disjoint eviction classes (see the module docstring).
        self._doomed: OrderedDict[int, None] = OrderedDict()  # no expected reuse: evict first
        self._cached: OrderedDict[int, None] = OrderedDict()  # unranked, LRU: oldest first
        self._awaited: dict[int, tuple[float, int]] = {}  # block -> (expected reuse time, seq)
        self._awaited_heap: list[tuple[float, int, int]] = []  # (-time, seq, block), lazy
        self._seq = 0
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.hits = 0  # prefix-cache hit blocks since start
        self.queries = 0

    # ---- capacity -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Usable blocks (excludes the dummy page)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks obtainable right now: truly free plus evictable cached ones."""
        return len(self._free) + self.num_cached

    @property
    def num_cached(self) -> int:
        return len(self._doomed) + len(self._cached) + len(self._awaited)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks (ref count 1), evicting LRU cached blocks if needed."""
        if n < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        if n > len(self._free) and n > self.num_free:  # (the free list alone: no property call)
            raise PoolExhaustedError(f"asked for {n} blocks, only {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b = self._pop_victim()
                self._drop_hash(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; hashed blocks go to the cached LRU, others to free.

        Blocks are released in reverse so that a sequence's tail blocks are evicted before its
        head: a later request is far more likely to share the head of a prefix.
        """
        for b in reversed(blocks):
            if b == DUMMY_PAGE or self._ref[b] <= 0:
                raise ValueError(f"double free or invalid block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def fork(self, blocks: Sequence[int]) -> None:
        """Add one reference to each in-use block (sharing)."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"cannot share block {b}: not in use")
            self._ref[b] += 1

    # ---- prefix cache ---------------------------------------------------------------------
    def lookup_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Longest run of cached blocks matching ``hashes`` from the start (not yet taken)."""
        if not self.enable_prefix_cache:
            return []
        out = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def take_cached(self, blocks: Sequence[int]) -> None:
        """Acquire blocks found by :meth:`lookup_prefix` (revives cached ones)."""
        self.queries += 1
        for b in blocks:
            if self._ref[b] == 0:
                self._unrank(b)
            self._ref[b] += 1
        self.hits += len(blocks)

    def hold(self, blocks: Sequence[int]) -> None:
        """Add one reference to each block, in use or cached (a cached one leaves the eviction
        order until released). Unlike :meth:`take_cached` this is not a prefix-cache hit: it
        is how a pin or an in-flight copy keeps pages from being recycled."""
        for b in blocks:
            if self._ref[b] == 0:
                if b not in self._hash_of:
                    raise ValueError(f"cannot hold block {b}: it is free")
                self._unrank(b)
            self._ref[b] += 1

    def register(self, block: int, h: bytes) -> None:
        """Record that in-use ``block`` now holds the full block with chained hash ``h``."""
        if not self.enable_prefix_cache or block in self._hash_of:
            return
        if self._ref[block] <= 0:
            raise ValueError(f"cannot register hash for block {block}: not in use")
        if h in self._block_of:
            return  # an identical block is already cached; keep the older one
        self._hash_of[block] = h
        self._block_of[h] = block

    def hash_of(self, block: int) -> bytes | None:
        return self._hash_of.get(block)

    def evict_cached(self, n: int | None = None) -> int:
        """Drop up to ``n`` (all if None) cached blocks to the free list; returns how many."""
        count = 0
        while self.num_cached and (n is None or count < n):
            b = self._pop_victim()
            self._drop_hash(b)
            self._free.append(b)
            count += 1
        return count

    # ---- eviction order -----------------------------------------------------------------
    def demote(self, blocks: Sequence[int]) -> int:
        """Evict these cached blocks before any other (no reuse expected); blocks in use or
        not cached are ignored. Returns how many were demoted."""
        n = 0
        for b in blocks:
            if self._ref[b] == 0 and b in self._hash_of and b not in self._doomed:
                self._unrank(b)
                self._doomed[b] = None
                n += 1
        return n

    def expect_reuse(self, blocks: Sequence[int], at: float) -> int:
        """These cached blocks will be wanted at clock time ``at``: evict them only after
        every unranked block, the latest ``at`` first. Blocks in use or not cached are
        ignored. Returns how many were ranked."""
        n = 0
        for b in blocks:
            if self._ref[b] == 0 and b in self._hash_of:
                self._unrank(b)
                self._seq += 1
                self._awaited[b] = (at, self._seq)
                heapq.heappush(self._awaited_heap, (-at, self._seq, b))
                n += 1
        return n

    def _unrank(self, b: int) -> None:
        """Remove cached block ``b`` from whichever eviction class holds it (heap entries
        are dropped lazily)."""
        if b in self._cached:
            del self._cached[b]
        elif b in self._doomed:
            del self._doomed[b]
        elif self._awaited.pop(b, None) is not None and (
            len(self._awaited_heap) > 2 * len(self._awaited) + 64
        ):
            # compact the stale entries so a long run's heap stays proportional to the class
            self._awaited_heap = [(-at, q, k) for k, (at, q) in self._awaited.items()]
            heapq.heapify(self._awaited_heap)

    def _pop_victim(self) -> int:
        """Remove and return the cached block to evict next."""
        if self._doomed:
            return self._doomed.popitem(last=False)[0]
        if self._cached:
            return self._cached.popitem(last=False)[0]
        while True:
            neg_at, seq, b = heapq.heappop(self._awaited_heap)
            if self._awaited.get(b) == (-neg_at, seq):
                del self._awaited[b]
                return b

    def _drop_hash(self, b: int) -> None:
        h = self._hash_of.pop(b, None)
        if h is not None and self._block_of.get(h) == b:
            del self._block_of[h]

    # ---- invariants -----------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Assert the pool's invariants; raises AssertionError with the broken one."""
        free = set(self._free)
        cached = set(self._cached) | set(self._doomed) | set(self._awaited)
        assert len(cached) == self.num_cached, "block in two eviction classes"
        used = {b for b in range(1, self.num_blocks) if self._ref[b] > 0}
        assert len(free) == len(self._free), "duplicate ids on the free list"
        assert DUMMY_PAGE not in free | cached | used, "dummy page handed out"
        assert not (free & cached) and not (free & used) and not (cached & used), (
            "block in two states"
        )
        assert len(free) + len(cached) + len(used) == self.capacity, (
            f"free {len(free)} + cached {len(cached)} + used {len(used)} != {self.capacity}"
        )
        assert all(self._ref[b] == 0 for b in free | cached), "free/cached block with refs"
        assert all(r >= 0 for r in self._ref), "negative ref count"
        assert all(b in self._hash_of for b in cached), "cached block without hash"
        for h, b in self._block_of.items():
            assert self._hash_of.get(b) == h, "hash maps out of sync"
