"""KV memory hierarchy (issue #4): host block pool invariants, bit-exact transfers, the cost
model, and the rule that the host tier changes *when* tokens are computed, never *which*:
greedy outputs are identical whether a prefix comes from the device cache, the host cache,
recompute or a swap, and stay correct under deferred copies, failed copies and a full host."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.copies import defer_copies
from tokencake.llm import LLM
from tokencake.memory.block_pool import BlockPool, block_hashes
from tokencake.memory.cost_model import BandwidthEstimator, CostModel
from tokencake.memory.host_kv import allocate_host_kv, host_memory_kind
from tokencake.memory.host_pool import HostBlockPool, HostPoolExhaustedError
from tokencake.memory.kv_cache import KVCacheSpec
from tokencake.memory.transfer import TransferEngine
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.copies import CopyTracker, FenceViolationError
from tokencake.scheduler.faults import StepFailed
from tokencake.scheduler.plan import BlockCopy
from tokencake.scheduler.policy import Policy

PROMPTS = [
    "multi-agent applications alternate llm calls and tool calls " * 3,
    "0123456789" * 9,
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello world, hello world!",
]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
HOST = dict(host_kv_gib=0.01)


def H(i: int) -> bytes:
    return i.to_bytes(16, "little")


# ---- HostBlockPool ------------------------------------------------------------------------
def test_host_pool_prefix_retention_and_lru():
    pool = HostBlockPool(5, 16)  # 4 usable
    blocks = pool.allocate(3)
    for b, i in zip(blocks, range(3), strict=True):
        assert pool.register(b, H(i))
    assert pool.lookup_prefix([H(0), H(1)]) == []  # pending writes are invisible (fence)
    pool.complete_write(blocks)
    assert pool.lookup_prefix([H(0), H(1), H(9), H(2)]) == blocks[:2]
    assert pool.retain([H(0), H(1), H(7)]) == [H(0), H(1)]
    pool.free(blocks)
    pool.check_integrity()
    assert pool.num_free == 2 and pool.num_retained == 2  # 1 free + 1 cached (H2)
    taken = pool.allocate(2)  # evicts H2, never the retained H0/H1
    assert pool.lookup_prefix([H(0), H(1), H(2)]) == blocks[:2]
    assert pool.try_allocate(1) is None
    with pytest.raises(HostPoolExhaustedError):
        pool.allocate(1)
    pool.release([H(0), H(1)])
    pool.check_integrity()
    assert pool.num_free == 2  # released blocks rejoin the LRU
    pool.free(taken)
    pool.check_integrity()
    with pytest.raises(ValueError):
        pool.free(taken[:1])


def test_host_pool_discard_drops_retention():
    pool = HostBlockPool(4, 16)
    (b,) = pool.allocate(1)
    pool.register(b, H(1))
    assert pool.retain([H(1)]) == [H(1)]
    pool.discard([b])  # the copy failed: the data never arrived
    pool.release([H(1)])  # no-op, does not raise
    pool.check_integrity()
    assert pool.num_free == pool.capacity and pool.block_of(H(1)) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("arfdpRcx"), st.integers(0, 9)), max_size=60))
def test_host_pool_random_ops_keep_invariants(ops):
    pool = HostBlockPool(7, 16)
    owned: list[int] = []
    retained: list[bytes] = []
    for op, i in ops:
        if op == "a" and pool.try_allocate(0) is not None:
            got = pool.try_allocate(1)
            if got:
                if not pool.register(got[0], H(i)):
                    pool.free(got)
                    continue
                owned.append(got[0])
        elif op == "c" and owned:
            pool.complete_write([owned[i % len(owned)]])
        elif op == "f" and owned:
            b = owned.pop(i % len(owned))
            pool.complete_write([b])
            pool.free([b])
        elif op == "x" and owned:
            pool.discard([owned.pop(i % len(owned))])
        elif op == "r":
            retained += pool.retain([H(i)])
        elif op == "R" and retained:
            pool.release([retained.pop(i % len(retained))])
        elif op == "p":
            hit = pool.lookup_prefix([H(i)])
            if hit:
                pool.acquire(hit)
                pool.free(hit)
        elif op == "d":
            pool.evict_cached(1)
        pool.check_integrity()
        for h in retained:  # retention pins: a retained, written block is never evicted
            assert pool.block_of(h) is not None or h not in pool._retain


# ---- transfers ----------------------------------------------------------------------------
class _Owner:
    def __init__(self, spec: KVCacheSpec, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        dt = jax.numpy.dtype(spec.dtype)
        self.k0 = rng.standard_normal(spec.shape).astype(dt)
        self.v0 = rng.standard_normal(spec.shape).astype(dt)
        self.k, self.v = jax.device_put(self.k0), jax.device_put(self.v0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", [True, None], ids=["pinned_host", "numpy"])
def test_round_trip_is_bit_exact(dtype, kind):
    spec = KVCacheSpec(2, 24, 4, 2, 8, dtype)
    owner = _Owner(spec)
    host = allocate_host_kv(spec, 12, memory_kind=kind)
    te = TransferEngine(owner, host, max_bucket=4)
    src, hb, dst = [3, 5, 7, 1, 2, 20], [1, 2, 3, 4, 5, 11], [9, 10, 11, 4, 6, 23]
    out = te.issue("d2h", src, hb)
    te.wait()
    assert out.ok and not te.in_flight
    for s, h in zip(src, hb, strict=True):
        hk, hv = host.block(h)
        assert hk.tobytes() == owner.k0[:, s].tobytes() and hv.tobytes() == owner.v0[:, s].tobytes()
    back = te.issue("h2d", dst, hb)
    te.wait()
    assert back.ok and not te.in_flight
    k, v = np.asarray(owner.k), np.asarray(owner.v)
    assert k[:, dst].tobytes() == owner.k0[:, src].tobytes()
    assert v[:, dst].tobytes() == owner.v0[:, src].tobytes()
    rest = [i for i in range(1, spec.num_pages) if i not in dst]
    assert k[:, rest].tobytes() == owner.k0[:, rest].tobytes()  # nothing else touched
    assert te.bandwidth.samples == {"d2h": 1, "h2d": 1}


def test_host_memory_kind_and_buckets():
    dev = jax.devices()[0]
    assert host_memory_kind(dev) in ("pinned_host", None)
    spec = KVCacheSpec(1, 40, 4, 1, 4)
    te = TransferEngine(_Owner(spec), allocate_host_kv(spec, 40), max_bucket=8)
    assert te.buckets == (1, 2, 4, 8)
    te.warmup()
    assert len(te._compiled) == 8 and te.strict
    te.issue("d2h", list(range(1, 20)), list(range(1, 20)))  # 19 blocks: 8 + 8 + 3 (padded)
    te.wait()
    assert len(te._compiled) == 8 and te.completed == 1
    with pytest.raises(ValueError):
        te.issue("d2h", [0], [1])  # the dummy page is never copied


def test_copy_tracker_fences_and_completion():
    """One tracker: a copy holds its device pages (and a copy-in its host pages) until it is
    reported; steps touching pages in flight are refused; completion publishes host pages,
    drops the fence before the issuer's callback and routes the callback by the copy."""
    pool, host = BlockPool(9, 4), HostBlockPool(5, 4)
    tr = CopyTracker(pool, host)
    dev = pool.allocate(2)
    hb = host.allocate(2)
    for i, b in enumerate(hb):
        host.register(b, H(i), pending=True)
    seen = []
    out = tr.issue(
        "d2h",
        dev,
        hb,
        "d2h:r",
        "core",
        lambda c, ok: seen.append((c.tag, ok, pool.ref_count(c.device_blocks[0]))),
    )
    assert [pool.ref_count(b) for b in dev] == [2, 2] and tr.in_flight == 1
    assert tr.take_new() == [out] and tr.take_new() == []
    with pytest.raises(FenceViolationError):
        tr.check_step(attended=[[dev[0]]], written=[[dev[1]]])
    tr.check_step(attended=[dev], written=[])  # reading pages under a copy-out is fine
    with pytest.raises(FenceViolationError):
        tr.issue("h2d", [dev[0]], [hb[0]], "h2d:r", "core")
    tr.complete([out])
    assert seen == [(out.tag, True, 1)] and tr.in_flight == 0  # fence gone before the callback
    assert not host.is_pending(hb[0])
    new = pool.allocate(1)
    back = tr.issue("h2d", new, [hb[0]], "h2d:r", "time")
    assert pool.ref_count(new[0]) == 2 and tr.copies_from("time", "h2d") == [back]
    with pytest.raises(FenceViolationError):
        tr.check_step(attended=[new], written=[])
    tr.complete([], [back])
    assert pool.ref_count(new[0]) == 1 and tr.num_failed == 1
    with pytest.raises(ValueError, match="unknown copy"):
        tr.complete([BlockCopy("d2h", (1,), (1,), "nope")])


def test_cost_model():
    bw = BandwidthEstimator()
    cm = CostModel(3 * 2**20, bw)
    assert cm.copy_time(0, "d2h") == 0.0
    assert cm.copy_time(10, "h2d") == pytest.approx(10 * 3 * 2**20 / 12e9 + 10 * 3e-6)
    bw.observe("d2h", 4e9, 1.0)
    bw.observe("d2h", 2e9, 1.0)
    assert bw["d2h"] == pytest.approx(3e9) and bw["h2d"] == 12e9  # EWMA alpha=0.5
    fixed = CostModel.fixed(1000, bandwidth=1e6, base_s=0.5, recompute=(0.1, 0.01, 1e-4))
    assert fixed.copy_time(2, "d2h") == pytest.approx(0.5 + 2e-3 + 6e-6)
    assert fixed.recompute_time(10, 100) == pytest.approx(0.1 + 0.1 + 0.1)
    # Under tensor parallelism each of the 4 shards copies a quarter of the block at once, over
    # its own link: the (per-shard) bandwidth moves bytes_per_block / 4 per block.
    tp = CostModel(3 * 2**20, BandwidthEstimator(), shards=4)
    assert tp.copy_time(10, "h2d") == pytest.approx(10 * 3 * 2**20 / 4 / 12e9 + 10 * 3e-6)
    with pytest.raises(ValueError, match="shards"):
        CostModel(1, shards=0)
    cm.fit_recompute(
        [(n, c, 0.002 + 1e-4 * n + 1e-7 * n * c) for n in (8, 32, 64) for c in (0, 256)]
    )
    assert (cm.recompute_a, cm.recompute_b, cm.recompute_c) == pytest.approx(
        (0.002, 1e-4, 1e-7), rel=1e-6
    )


# ---- the engine -------------------------------------------------------------------------------
def generate(engine, prompts=PROMPTS):
    return [o.token_ids for o in LLM.from_engine(engine).generate(prompts, GREEDY)]


@pytest.fixture
def reference(make_engine):
    llm = LLM.from_engine(make_engine(enable_prefix_cache=False))
    return [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def settle(engine):
    engine.sync_transfers()
    assert engine.scheduler.copies.in_flight == 0
    engine.pool.check_integrity()
    engine.host_pool.check_integrity()
    assert engine.pool.num_used == 0, "device blocks leaked"
    assert engine.host_pool.num_used == 0 and engine.host_pool.num_retained == 0, (
        "host blocks leaked"
    )


def offload_cached_prefixes(engine, prompts):
    """Copy every device-cached full block of ``prompts`` to the host tier, then drop the
    device cache, so the next run can only find those prefixes on the host."""
    for p in prompts:
        hashes = block_hashes(engine.tokenizer.encode(p), engine.pool.block_size)
        blocks = engine.pool.lookup_prefix(hashes)
        engine.scheduler.host_tier.offload_blocks(blocks, hashes[: len(blocks)], retain=False)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.pool.evict_cached() > 0


def test_host_cache_hits_match_device_hits_and_recompute(make_engine, reference):
    engine = make_engine(**HOST)
    assert generate(engine) == reference  # cold
    assert generate(engine) == reference  # device prefix hits
    offload_cached_prefixes(engine, PROMPTS)
    h2d_before = engine.transfer.bandwidth.samples["h2d"]
    assert generate(engine) == reference  # host prefix hits, copied back in
    assert engine.transfer.bandwidth.samples["h2d"] > h2d_before
    assert engine.transfer.failed == 0
    settle(engine)


def test_swap_preemption_matches_ample_pool(make_engine, reference):
    engine = make_engine(num_pages=14, max_num_seqs=6, preemption_mode="swap", **HOST)
    assert generate(engine) == reference
    assert engine.scheduler.host_tier.num_swap_outs > 0
    settle(engine)


def test_swap_with_prefix_cache_off(make_engine, reference):
    engine = make_engine(
        num_pages=14, max_num_seqs=6, preemption_mode="swap", enable_prefix_cache=False, **HOST
    )
    assert generate(engine) == reference
    assert engine.scheduler.host_tier.num_swap_outs > 0
    settle(engine)


class _RecomputeVictims(Policy):
    def preemption_mode(self, victim):
        return "recompute"


def test_policy_hook_chooses_preemption_mode(make_engine, reference):
    engine = make_engine(
        _RecomputeVictims, num_pages=14, max_num_seqs=6, preemption_mode="swap", **HOST
    )
    assert generate(engine) == reference
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.host_tier.num_swap_outs == 0
    settle(engine)


def test_host_pool_exhaustion_falls_back_to_recompute(make_engine, reference):
    engine = make_engine(num_pages=14, max_num_seqs=6, preemption_mode="swap", **HOST)
    engine.host_pool.allocate(engine.host_pool.capacity)  # hog every host block
    hog = list(range(1, engine.host_pool.num_blocks))
    assert generate(engine) == reference
    assert (
        engine.scheduler.host_tier.num_swap_fallbacks > 0
        and engine.scheduler.host_tier.num_swap_outs == 0
    )
    engine.host_pool.free(hog)
    settle(engine)


def test_failed_copies_degrade_to_recompute(make_engine, reference):
    engine = make_engine(num_pages=14, max_num_seqs=6, preemption_mode="swap", **HOST)
    te = engine.transfer

    def broken(direction, dev, host):
        raise RuntimeError("injected transfer failure")

    te._dispatch = broken
    assert generate(engine) == reference
    assert te.failed > 0 and engine.scheduler.copies.num_failed == te.failed
    settle(engine)
    # Failed copy-ins too: offload with a working engine, then break it for the copy back.
    del te._dispatch
    generate(engine)
    offload_cached_prefixes(engine, PROMPTS)
    te._dispatch = broken
    assert generate(engine) == reference
    settle(engine)


def test_fence_copy_in_waits_for_landing(make_engine, reference):
    engine = make_engine(**HOST)
    generate(engine)
    offload_cached_prefixes(engine, PROMPTS[:1])
    queued, release = defer_copies(engine.transfer, "h2d")
    rid = engine.add_request(PROMPTS[0], GREEDY)
    for _ in range(5):  # the copy-in has not landed: the request must not run
        engine.step()
        assert queued and engine.scheduler.requests[rid].output_token_ids == []
    assert engine.scheduler.copies.fenced_blocks("h2d")
    release()
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o.token_ids if o.finished else out
    assert out == reference[0]
    settle(engine)


def test_fence_copy_in_is_needed(make_engine, reference, caplog):
    """Without the fence (counting host pages as computed at once) the deferred copy-in
    makes the step attend garbage: the check refuses the step loudly (the fence violation is
    logged and the step's request aborted with StepFailed) instead of corrupting output."""
    engine = make_engine(**HOST)
    generate(engine)
    offload_cached_prefixes(engine, PROMPTS[:1])
    defer_copies(engine.transfer, "h2d")
    sched = engine.scheduler
    real = sched._admit_with_copy_in

    def unfenced(req, now):
        admitted = real(req, now)
        if admitted:  # count the host pages as computed before the copy-in has landed
            sched.host_tier.forget(req.request_id)
            req.num_computed_tokens = len(req.block_ids) * engine.pool.block_size
        return admitted

    sched._admit_with_copy_in = unfenced
    rid = engine.add_request(PROMPTS[0], GREEDY)
    outs = [o for _ in range(3) for o in engine.step()]
    assert [(o.request_id, o.token_ids, type(o.error)) for o in outs] == [(rid, [], StepFailed)]
    assert any(isinstance(r.exc_info[1], FenceViolationError) for r in caplog.records if r.exc_info)


def test_fence_copy_out_holds_device_blocks(make_engine, reference):
    engine = make_engine(num_pages=14, max_num_seqs=6, preemption_mode="swap", **HOST)
    queued, release = defer_copies(engine.transfer, "d2h")
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    outputs = {}
    held_seen = False
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.token_ids
        steps += 1
        held = set(engine.scheduler.copies.fenced_blocks("d2h"))
        # Pages under a copy-out are never free, whatever happened to their owner.
        assert all(engine.pool.ref_count(b) > 0 for b in held)
        held_seen |= bool(held)
        if steps % 7 == 0:
            release()
        assert steps < 2000
    assert held_seen and engine.scheduler.host_tier.num_swap_outs > 0
    assert [outputs[i] for i in ids] == reference
    settle(engine)
