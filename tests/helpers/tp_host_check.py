"""The host KV tier under tensor parallelism on N simulated CPU devices; prints one JSON object.

Invoked in a subprocess by tests/test_tp_host_tier.py (the device count must be fixed before JAX
starts). Parts, each a key of the output:

* ``transfer``: page copies between a KV-head-sharded device cache and the host tier (pinned
  and numpy), round trip bit-exact, every host shard beside its own device, no collective in
  the compiled copies;
* ``hits`` / ``swap``: greedy tokens with the host tier on at TP=N (prefixes found only on the
  host; swap preemption) next to the TP=1 run without a host tier and without memory pressure;
* ``time``: the Time Scheduler's offload -> predictive upload of an agent's KV during a tool
  call at TP=N, with digests of the agent's pages before the offload, on the host, and after the
  upload (every free device page is poisoned while the KV is on the host, so only the upload
  can restore them), and the tokens next to the unpressured TP=1 ``vllm`` run.

Each part also reports its ``seconds``.

Usage: ``python tests/helpers/tp_host_check.py N [part ...]`` (default: every part).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time

n = int(sys.argv[1])
parts = sys.argv[2:] or ["transfer", "hits", "swap", "time"]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.conftest import TINY_ENGINE, lively_params  # noqa: E402
from tokencake.config import EngineConfig  # noqa: E402
from tokencake.engine import LLMEngine  # noqa: E402
from tokencake.memory.block_pool import block_hashes  # noqa: E402
from tokencake.memory.host_kv import allocate_host_kv  # noqa: E402
from tokencake.memory.kv_cache import KVCacheSpec  # noqa: E402
from tokencake.memory.transfer import TransferEngine  # noqa: E402
from tokencake.models import sharding  # noqa: E402
from tokencake.models.config import tiny_config  # noqa: E402
from tokencake.models.tokenizer import Tokenizer  # noqa: E402

CFG = tiny_config(num_heads=8, num_kv_heads=4)  # splits over 1, 2 and 4 devices
MODEL = (CFG, lively_params(CFG), Tokenizer.byte_level_for_tests())
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# ---- transfer: the TransferEngine alone on a sharded cache -------------------------------------
class _Owner:
    def __init__(self, spec: KVCacheSpec, kv_sharding) -> None:
        rng = np.random.default_rng(0)
        self.k0 = rng.standard_normal(spec.shape).astype(np.float32)
        self.v0 = rng.standard_normal(spec.shape).astype(np.float32)
        self.k, self.v = jax.device_put(self.k0, kv_sharding), jax.device_put(self.v0, kv_sharding)


def _placement(host, kv_sharding) -> bool:
    """Every device holds, in host memory, the host copy of exactly the KV heads it holds on the
    device: host shard indices equal the device cache sharding's indices for the host shape."""
    want = {d: str(i) for d, i in kv_sharding.devices_indices_map(host.spec.shape).items()}
    if host.memory_kind is None:
        got = {s.device: str(s.index) for s in host.shards}
        return got == want and len(host.shards) == n
    for arr in (host.k, host.v):
        shards = arr.addressable_shards
        if any(s.data.sharding.memory_kind != host.memory_kind for s in shards):
            return False
        if {s.device: str(s.index) for s in shards} != want or len(shards) != n:
            return False
    return True


def check_transfer() -> dict:
    mesh = sharding.make_mesh(n)
    kv_sharding = sharding.kv_sharding(mesh)
    spec = KVCacheSpec(2, 24, 4, CFG.num_kv_heads, 8)
    out = {}
    for kind, label in ((True, "pinned"), (None, "numpy")):
        owner = _Owner(spec, kv_sharding)
        host = allocate_host_kv(spec, 12, memory_kind=kind, sharding=kv_sharding)
        te = TransferEngine(owner, host, max_bucket=4)
        te.warmup()
        src, hb, dst = [3, 5, 7, 1, 2, 20], [1, 2, 3, 4, 5, 11], [9, 10, 11, 4, 6, 23]
        d2h = te.issue("d2h", src, hb)
        te.wait()
        host_exact = all(
            digest(*host.block(h)) == digest(owner.k0[:, s], owner.v0[:, s])
            for s, h in zip(src, hb, strict=True)
        )
        h2d = te.issue("h2d", dst, hb)
        te.wait()
        k, v = np.asarray(owner.k), np.asarray(owner.v)
        rest = [i for i in range(1, spec.num_pages) if i not in dst]
        round_trip = digest(k[:, dst], v[:, dst]) == digest(owner.k0[:, src], owner.v0[:, src])
        texts = [c.as_text() for c in te._compiled.values() if hasattr(c, "as_text")]
        out[label] = {
            "memory_kind": host.memory_kind,
            "ok": d2h.ok and h2d.ok,
            "host_exact": host_exact,
            "round_trip_exact": round_trip,
            "rest_untouched": digest(k[:, rest]) == digest(owner.k0[:, rest]),
            "placement": _placement(host, kv_sharding),
            "device_sharding_kept": owner.k.sharding.is_equivalent_to(kv_sharding, 5),
            "collectives": sorted({c for t in texts for c in COLLECTIVES if c in t}),
            "num_compiled": len(texts),
            "bandwidth_samples": dict(te.bandwidth.samples),
            "num_shards": te.num_shards,
        }
        te.close()
    try:  # a host tier laid out for one device cannot serve a sharded cache
        TransferEngine(_Owner(spec, kv_sharding), allocate_host_kv(spec, 4)).close()
        out["mismatch"] = "accepted"
    except ValueError as exc:
        out["mismatch"] = str(exc)
    return out


# ---- engine: host prefix hits and swap preemption at TP=N ------------------------------------
def _engine(tp: int, **over) -> LLMEngine:
    cfg, params, tok = MODEL
    options = {**TINY_ENGINE, "tensor_parallel_size": tp, **over}
    return LLMEngine(EngineConfig(**options), model_config=cfg, params=params, tokenizer=tok)


@functools.cache
def reference() -> list[list[int]]:
    """TP=1, no host tier, no prefix cache, one prompt at a time: nothing to offload or hit."""
    from tests.test_memory_hierarchy import PROMPTS, generate

    eng = _engine(1, enable_prefix_cache=False)
    out = [generate(eng, [p])[0] for p in PROMPTS]
    eng.close()
    return out


def check_hits() -> dict:
    from tests.test_memory_hierarchy import HOST, PROMPTS, generate, offload_cached_prefixes, settle

    eng = _engine(n, **HOST)
    runs = [generate(eng), generate(eng)]  # cold, then device prefix hits
    offload_cached_prefixes(eng, PROMPTS)
    h2d_before = eng.transfer.bandwidth.samples["h2d"]
    runs.append(generate(eng))  # only the host tier holds the prefixes now
    settle(eng)
    out = {
        "reference": reference(),
        "tokens": runs,
        "h2d_copies": eng.transfer.bandwidth.samples["h2d"] - h2d_before,
        "failed": eng.transfer.failed,
        "host_shards": eng.transfer.num_shards,
        "cost_model_shards": eng.cost_model.shards,
        "kv_sharding": str(eng.runner.k.sharding),
    }
    eng.close()
    return out


def check_swap() -> dict:
    from tests.test_memory_hierarchy import HOST, generate, settle

    eng = _engine(n, num_pages=14, max_num_seqs=6, preemption_mode="swap", **HOST)
    tokens = generate(eng)
    settle(eng)
    out = {
        "reference": reference(),
        "tokens": tokens,
        "swap_outs": eng.scheduler.host_tier.num_swap_outs,
        "failed": eng.transfer.failed,
    }
    eng.close()
    return out


# ---- time: the Time Scheduler's offload -> upload round trip at TP=N --------------------------
def _poison_free_pages(eng: LLMEngine) -> int:
    """Drop every cached device block and fill every free page with a huge finite value, so
    what is read back from those pages later can only be what a copy wrote there. (Not NaN:
    page tails past a row's length are masked, and the reference attention's dense
    ``probs @ v`` turns 0 * NaN into NaN; see tests/test_attention.py.)"""
    eng.pool.evict_cached()
    free = [b for b in range(1, eng.pool.capacity + 1) if eng.pool.ref_count(b) == 0]
    r = eng.runner
    r.k = jax.device_put(r.k.at[:, free].set(1e30), r.k.sharding)
    r.v = jax.device_put(r.v.at[:, free].set(1e30), r.v.sharding)
    return len(free)


def check_time() -> dict:
    from tests import test_time_scheduler_engine as tse
    from tokencake.scheduler.time_sched import PState

    ref = tse._start_turn(MODEL, "vllm", 3.0, pressure=False)
    ref.step_until(lambda: "B" in ref.outs and "D" in ref.outs)
    ref.event("stall_finished")
    tse._finish_turn(ref)
    tse._check_clean(ref)
    expected = tse._outputs(ref)
    ref.engine.close()

    run = tse._start_turn(MODEL, tse.TC, 3.0, tp=n)
    eng, ts = run.engine, run.ts
    hashes = block_hashes(tse.PROMPT_A + run.outs["A"].token_ids, tse.BS)
    before = eng.pool.lookup_prefix(hashes)
    hashes = hashes[: len(before)]

    def pages(blocks):
        return np.asarray(eng.runner.k)[:, blocks], np.asarray(eng.runner.v)[:, blocks]

    before_digest = digest(*pages(before))
    run.step_until(lambda: ts.items["A"].state is PState.OFFLOADED)
    host_blocks = [eng.host_pool.block_of(h) for h in hashes]
    on_host = [eng.transfer.host.block(b) for b in host_blocks]
    host_digest = digest(*[np.stack([kv[i] for kv in on_host], axis=1) for i in (0, 1)])
    poisoned = _poison_free_pages(eng)
    device_hits_left = len(eng.pool.lookup_prefix(hashes))
    run.step_until(lambda: run.clock() >= run.t_start + 3.0)
    state = ts.items["A"].state.value
    after = eng.pool.lookup_prefix(hashes)
    after_digest = digest(*pages(after))
    run.event("stall_finished")
    tse._finish_turn(run)
    tse._check_clean(run)
    out = {
        "reference": expected,
        "tokens": tse._outputs(run),
        "blocks": len(before),
        "poisoned_pages": poisoned,
        "device_hits_after_poison": device_hits_left,
        "state_at_return": state,
        "offloads": ts.counters.get("offloads", 0),
        "uploads": ts.counters.get("uploads", 0),
        "before": before_digest,
        "on_host": host_digest,
        "after": after_digest,
        "a2_cached_tokens": run.outs["A2"].num_cached_tokens,
        "kv_sharding": str(eng.runner.k.sharding),
    }
    eng.close()
    return out


CHECKS = {"transfer": check_transfer, "hits": check_hits, "swap": check_swap, "time": check_time}
results = {}
for part in parts:
    t0 = time.perf_counter()
    results[part] = CHECKS[part]()
    results[part]["seconds"] = round(time.perf_counter() - t0, 1)
print(json.dumps(results))
