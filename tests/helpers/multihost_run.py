"""One process of a two-process (multi-controller) run on simulated CPU devices, or the
single-process reference; prints one JSON line. Invoked by tests/test_multihost.py.

``python tests/helpers/multihost_run.py single TP`` -- one process with TP CPU devices, tensor
parallel over all of them, no host tier and no memory pressure: the reference tokens.

``python tests/helpers/multihost_run.py dist DEVICES [--host-tier] [--die-after N]`` -- one of the
processes of a distributed run (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` set by the caller, as the README's deployment notes say), each with DEVICES
CPU devices; TP spans every process's devices. Rank 0 leads: it generates and prints the tokens.
The others follow (``LLMEngine.follow``) and print how many device calls they replayed.
``--host-tier``: a host KV tier and a device pool small enough that requests are swapped out and
back, then one explicit offload -> upload round trip whose bytes every process checks on its
own shards. ``--die-after N``: a follower exits abruptly after replaying N device calls (the
leader must fail its requests with a clear error and stop). ``--warmup``: compile every step
shape first (a smaller engine: three shapes), as ``tokencake serve`` does. ``--model default``:
SmolLM2-135M (the default GGUF, its own tokenizer) instead of the tiny random model; its 3 KV
heads make TP = 3, so three processes of one device (or one process of three).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("role", choices=["single", "dist"])
ap.add_argument("devices", type=int)
ap.add_argument("--host-tier", action="store_true")
ap.add_argument("--die-after", type=int, default=None)
ap.add_argument("--warmup", action="store_true")
ap.add_argument("--model", choices=["tiny", "default"], default="tiny")
args = ap.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TOKENCAKE_XLA_CACHE", "")  # every run compiles (as in tests/conftest.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from tests.conftest import TINY_ENGINE, lively_params  # noqa: E402
from tokencake.config import EngineConfig  # noqa: E402
from tokencake.engine import LLMEngine  # noqa: E402
from tokencake.llm import LLM  # noqa: E402
from tokencake.memory.block_pool import DUMMY_PAGE, block_hashes  # noqa: E402
from tokencake.models.config import tiny_config  # noqa: E402
from tokencake.models.tokenizer import Tokenizer  # noqa: E402
from tokencake.multihost import exit_now  # noqa: E402
from tokencake.sampling_params import SamplingParams  # noqa: E402

CFG = tiny_config(num_heads=8, num_kv_heads=4)
# About three pages each: with --host-tier's 9-page pool they fit when admitted, but not once
# their outputs cross into a fourth page, so some are swapped out and back.
PROMPTS = [
    "multi-agent apps alternate llm and tools",
    "0123456789" * 4,
    "the quick brown fox jumps over the lazy dog",
]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def engine(**over) -> LLMEngine:
    if args.model == "default":
        return LLMEngine(EngineConfig(**{**TINY_ENGINE, **over}))  # model=None: the default
    return LLMEngine(
        EngineConfig(**{**TINY_ENGINE, **over}),
        model_config=CFG,
        params=lively_params(CFG),
        tokenizer=Tokenizer.byte_level_for_tests(),
    )


def digest(arrays: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def local_pages(eng: LLMEngine, pages: list[int]) -> str:
    """This process's shards of device ``pages`` (K and V)."""
    r = eng.runner
    return digest([np.asarray(s.data)[:, pages] for x in (r.k, r.v) for s in x.addressable_shards])


def local_host_blocks(eng: LLMEngine, blocks: list[int]) -> str:
    """This process's shards of host ``blocks`` (K and V), read like ``local_pages``."""
    h = eng.transfer.host
    if h.memory_kind is None:
        return digest([s.k[:, blocks] for s in h.shards] + [s.v[:, blocks] for s in h.shards])
    return digest([np.asarray(s.data)[:, blocks] for x in (h.k, h.v) for s in x.addressable_shards])


if args.role == "single":
    eng = engine(tensor_parallel_size=args.devices, enable_prefix_cache=False)
    print(
        json.dumps(
            {"tokens": [o.token_ids for o in LLM.from_engine(eng).generate(PROMPTS, GREEDY)]}
        )
    )
    sys.exit(0)

import jax  # noqa: E402

over = dict(
    tensor_parallel_size=args.devices * int(os.environ["JAX_NUM_PROCESSES"]), distributed=True
)
if args.warmup:  # as `tokencake serve` does; few shapes, so it is quick
    over.update(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, max_prefill_chunk=32,
                max_prefill_seqs=1, warmup=True)  # fmt: skip
if args.host_tier:
    over.update(host_kv_gib=0.002, num_pages=10, max_num_seqs=3, preemption_mode="swap")
eng = engine(**over)
result: dict = {"rank": jax.process_index(), "processes": jax.process_count()}
copies: list[tuple[str, list[int], list[int]]] = []  # (direction, pages, host blocks) replayed
dst_before = ""  # this process's shards of the round trip's target pages before the upload

if jax.process_index() == 0:
    outs = LLM.from_engine(eng).generate(PROMPTS, GREEDY)
    result["tokens"] = [o.token_ids for o in outs]
    result["errors"] = sorted({str(o.error) for o in outs if o.error is not None})
    if eng.failure is not None:
        try:
            eng.add_request("one more")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["refused"] = f"{type(exc).__name__}: {exc}"
    elif args.host_tier:
        eng.sync_transfers()
        result["swap_outs"] = eng.scheduler.host_tier.num_swap_outs
        # One explicit round trip: cached pages of a finished request -> host -> other pages.
        cached = [
            eng.pool.lookup_prefix(block_hashes(eng.tokenize(p) + o.token_ids, eng.pool.block_size))
            for p, o in zip(PROMPTS, outs, strict=True)
        ]
        src = max(cached, key=len)[:2]
        eng.pool.hold(src)
        dst, hb = eng.pool.allocate(len(src)), eng.host_pool.allocate(len(src))
        for direction, pages in (("d2h", src), ("h2d", dst)):
            if direction == "h2d":
                dst_before = local_pages(eng, dst)
            copies.append((direction, pages, hb))
            assert eng.transfer.wait([eng.transfer.issue(direction, pages, hb)])[0].ok
        eng.pool.free(src + dst)
        eng.host_pool.free(hb)
        eng.sync_transfers()
        eng.pool.check_integrity()
        eng.host_pool.check_integrity()
        result["leaked"] = eng.pool.num_used + eng.host_pool.num_used
    result["kv_sharding"] = str(eng.runner.k.sharding)
    eng.close()  # releases the followers
else:
    run_inputs = eng.runner.run_inputs
    calls = [0]

    def replay(shape, arrays):
        calls[0] += 1
        if args.die_after is not None and calls[0] > args.die_after:
            print(
                json.dumps({"rank": jax.process_index(), "died_after": args.die_after}), flush=True
            )
            os._exit(3)  # abruptly, like a crashed host
        run_inputs(shape, arrays)

    eng.runner.run_inputs = replay
    if eng.transfer is not None:
        run_copy = eng.transfer.run_copy

        def copy(direction, ids, hids):
            global dst_before
            copies.append((direction, [int(i) for i in ids], [int(h) for h in hids]))
            if direction == "h2d":  # (the last one is the round trip's)
                dst_before = local_pages(eng, [int(i) for i in ids if i != DUMMY_PAGE])
            return run_copy(direction, ids, hids)

        eng.transfer.run_copy = copy
    result["followed"] = eng.follow()
    if eng.transfer is not None:
        jax.block_until_ready((eng.runner.k, eng.transfer.host.k))
    eng.close()

if len(copies) >= 2:  # the explicit round trip is the last two copies, on every process
    (_, src, hb), (_, dst, hb2) = copies[-2], copies[-1]
    n = len([p for p in src if p != DUMMY_PAGE])
    src, dst, hb = src[:n], dst[:n], hb[:n]
    result["round_trip"] = {
        "pages": n,
        "target_before": dst_before,
        "device_before": local_pages(eng, src),
        "host": local_host_blocks(eng, hb),
        "device_after": local_pages(eng, dst),
    }
print(json.dumps(result), flush=True)
if jax.process_index() == 0 and eng.failure is not None:
    exit_now(1)  # as `tokencake serve` does: JAX's exit-time shutdown would abort
