"""Device block pool: ref counts, the hash-chained prefix cache and its LRU, invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencake.memory.block_pool import BlockPool, PoolExhaustedError, block_hashes, chain_hash


def test_allocate_free_and_dummy_page():
    pool = BlockPool(8, 4)
    blocks = pool.allocate(7)
    assert 0 not in blocks and sorted(blocks) == list(range(1, 8))
    with pytest.raises(PoolExhaustedError):
        pool.allocate(1)
    pool.free(blocks)
    assert pool.num_free == 7
    with pytest.raises(ValueError, match="double free"):
        pool.free(blocks[:1])
    pool.check_integrity()


def test_hashes_are_chained():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] != b[1]  # same second block, different prefix
    assert a[0] == chain_hash(None, [1, 2, 3, 4])
    assert block_hashes([1, 2, 3], 4) == []  # partial blocks are never hashed


def test_prefix_cache_revive_and_lru_eviction():
    pool = BlockPool(4, 2)  # 3 usable blocks
    hs = block_hashes([1, 2, 3, 4, 5, 6], 2)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, hs, strict=True):
        pool.register(b, h)
    pool.free(blocks)
    assert pool.num_cached == 3 and pool.num_free == 3
    hit = pool.lookup_prefix(hs)
    assert hit == blocks
    pool.take_cached(hit[:2])
    assert pool.ref_count(blocks[0]) == 1 and pool.num_cached == 1
    # The only cached block left is evicted when a fresh block is needed.
    (fresh,) = pool.allocate(1)
    assert fresh == blocks[2] and pool.lookup_prefix(hs) == blocks[:2]
    pool.fork(blocks[:1])
    assert pool.ref_count(blocks[0]) == 2
    pool.free(blocks[:2])
    pool.free(blocks[:1])
    pool.free([fresh])
    pool.check_integrity()


def test_tail_blocks_are_evicted_before_head():
    pool = BlockPool(4, 1)
    hs = block_hashes([1, 2, 3], 1)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, hs, strict=True):
        pool.register(b, h)
    pool.free(blocks)
    pool.allocate(1)
    assert pool.lookup_prefix(hs) == blocks[:2]


def test_disabled_prefix_cache():
    pool = BlockPool(4, 2, enable_prefix_cache=False)
    (b,) = pool.allocate(1)
    pool.register(b, b"x" * 16)
    pool.free([b])
    assert pool.num_cached == 0 and pool.lookup_prefix([b"x" * 16]) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alloc", "free", "reg", "hit", "demote", "await", "evict"]),
            st.integers(0, 5),
        ),
        max_size=60,
    )
)
def test_random_operations_keep_invariants(ops):
    pool = BlockPool(10, 2)
    owned: list[int] = []
    seqs = [block_hashes(list(range(s, s + 8)), 2) for s in range(3)]
    for op, n in ops:
        if op == "alloc" and n <= pool.num_free:
            owned += pool.allocate(n)
        elif op == "free" and owned:
            pool.free(owned[: n + 1])
            owned = owned[n + 1 :]
        elif op == "reg" and owned:
            pool.register(owned[-1], seqs[n % 3][n % 4])
        elif op == "hit":
            hit = pool.lookup_prefix(seqs[n % 3])
            pool.take_cached(hit)
            owned += hit
        elif op == "demote":
            pool.demote(range(1, 10))
        elif op == "await":
            pool.expect_reuse(range(n, 10), at=float(n))
        elif op == "evict":
            pool.evict_cached(n)
        pool.check_integrity()
    pool.free(owned)
    pool.check_integrity()
    assert pool.num_free == pool.capacity


def _cached_pool(n: int) -> tuple[BlockPool, list[int]]:
    """A pool whose ``n`` usable blocks are all cached (hashed, released in id order)."""
    pool = BlockPool(n + 1, 1)
    blocks = pool.allocate(n)
    for b, h in zip(blocks, block_hashes(list(range(n)), 1), strict=True):
        pool.register(b, h)
    for b in blocks:
        pool.free([b])  # one at a time: LRU order = id order
    return pool, blocks


def test_eviction_follows_expected_reuse():
    """Demoted blocks go first, then unranked LRU, then blocks awaited latest-first."""
    pool, (b1, b2, b3, b4, b5, b6) = _cached_pool(6)
    assert pool.demote([b5]) == 1
    assert pool.expect_reuse([b1], at=10.0) == 1
    assert pool.expect_reuse([b2], at=50.0) == 1
    pool.check_integrity()
    assert pool.num_cached == 6 and pool.num_free == 6
    order = [pool.allocate(1)[0] for _ in range(6)]
    assert order == [b5, b3, b4, b6, b2, b1]
    pool.check_integrity()


def test_ranks_are_forgotten_when_blocks_are_taken_or_reranked():
    pool, (b1, b2, b3) = _cached_pool(3)
    pool.expect_reuse([b1], at=5.0)
    pool.take_cached([b1])  # revived: no longer cached, rank dropped
    assert pool.demote([b1]) == 0 and pool.expect_reuse([b1], 1.0) == 0  # in use: ignored
    pool.free([b1])  # back as an unranked, most recent LRU block
    pool.expect_reuse([b2], at=1.0)
    pool.expect_reuse([b2], at=99.0)  # re-ranked: the later time wins, no duplicate entry
    pool.demote([b3])
    pool.check_integrity()
    assert [pool.allocate(1)[0] for _ in range(3)] == [b3, b1, b2]
    pool.check_integrity()


def test_awaited_heap_stays_compact():
    pool, blocks = _cached_pool(4)
    for i in range(500):  # rank and revive over and over: stale heap entries are compacted
        pool.expect_reuse(blocks, at=float(i))
        pool.take_cached(blocks)
        pool.free(blocks)
    assert len(pool._awaited_heap) <= 2 * len(pool._awaited) + 64 + len(blocks)
    pool.check_integrity()
