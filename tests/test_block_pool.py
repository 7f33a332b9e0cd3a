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
        st.tuples(st.sampled_from(["alloc", "free", "reg", "hit"]), st.integers(0, 5)), max_size=60
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
        pool.check_integrity()
    pool.free(owned)
    pool.check_integrity()
    assert pool.num_free == pool.capacity
