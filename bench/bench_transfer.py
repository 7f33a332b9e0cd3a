"""KV transfer benchmark: copy-out / copy-in throughput of the TransferEngine vs a raw
``jax.device_put`` of the same bytes, and decode-step time with a large copy in flight.

Pages are shaped like the default model's (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64,
page 16, float32 = 737,280 B per block, K and V). Usage::

    python bench/bench_transfer.py --out transfer.json [--model tiny|default] [--repeats 5]

The decode part runs a real ``ModelRunner`` (the tiny random model by default: the point is
the interference, which a copy on the runner's own KV arrays causes through JAX's dataflow:
the step donates ``k``/``v`` and so waits for a copy that reads or writes them).

The third part (issue 17 item 5) splits the 256-block copy-out into its pieces, timed in
interleaved rounds: the raw ``device_put`` of the same bytes, the engine's fused copy, the
device-side gather alone, the host-side scatter alone, and a numpy ``memcpy`` of the same bytes
(the memory system's own speed for one read and one write of them). On the CPU backend every
XLA copy primitive (``device_put`` across memory kinds, gather, scatter) runs several times
slower than ``memcpy``, so the engine's copy, which must gather scattered pages and scatter
them again, costs about what two such primitives cost against the raw ``device_put``'s one
(RESULTS.md section 5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from tokencake.memory.host_kv import allocate_host_kv
from tokencake.memory.kv_cache import KVCacheSpec, allocate_kv_cache
from tokencake.memory.transfer import TransferEngine

SIZES = (1, 16, 256)


class _Owner:
    def __init__(self, spec: KVCacheSpec) -> None:
        self.k, self.v = allocate_kv_cache(spec)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_throughput(repeats: int) -> list[dict]:
    spec = KVCacheSpec(30, max(SIZES) + 8, 16, 3, 64, "float32")
    owner = _Owner(spec)
    host = allocate_host_kv(spec, max(SIZES) + 8)
    te = TransferEngine(owner, host, max_bucket=max(SIZES))
    te.warmup()
    dev = host.device
    host_sharding = SingleDeviceSharding(dev, memory_kind=host.memory_kind or "pinned_host")
    dev_sharding = SingleDeviceSharding(dev)
    rows = []
    for n in SIZES:
        ids = list(range(1, n + 1))
        nbytes = n * spec.bytes_per_page

        def copy(direction: str, ids=ids) -> None:
            te.issue(direction, ids, ids)
            te.wait()

        # The same bytes as one contiguous device array: what a raw device_put moves.
        pk = jax.block_until_ready(owner.k[:, 1 : n + 1])
        pv = jax.block_until_ready(owner.v[:, 1 : n + 1])
        hk = jax.block_until_ready(jax.device_put(pk, host_sharding))
        hv = jax.block_until_ready(jax.device_put(pv, host_sharding))

        def raw_out(pk=pk, pv=pv) -> None:
            jax.block_until_ready(
                (jax.device_put(pk, host_sharding), jax.device_put(pv, host_sharding))
            )

        def raw_in(hk=hk, hv=hv) -> None:
            jax.block_until_ready(
                (jax.device_put(hk, dev_sharding), jax.device_put(hv, dev_sharding))
            )

        for direction, raw in (("d2h", raw_out), ("h2d", raw_in)):
            copy(direction)  # settle
            t = _best(lambda d=direction: copy(d), repeats)
            r = _best(raw, repeats)
            rows.append(
                {
                    "direction": direction,
                    "blocks": n,
                    "bytes": nbytes,
                    "engine_gbps": nbytes / t / 1e9,
                    "raw_device_put_gbps": nbytes / r / 1e9,
                    "ratio": r / t,
                    "engine_ms": t * 1e3,
                    "raw_ms": r * 1e3,
                }
            )
    rows.append({"learned_bandwidth_gbps": {d: te.bandwidth[d] / 1e9 for d in ("d2h", "h2d")}})
    return rows


def bench_decomposition(repeats: int, n: int = 256) -> dict:
    """Median times of the pieces of an ``n``-block copy-out (see the module docstring)."""
    spec = KVCacheSpec(30, n + 8, 16, 3, 64, "float32")
    owner = _Owner(spec)
    host = allocate_host_kv(spec, n + 8)
    te = TransferEngine(owner, host, max_bucket=n)
    te.warmup()
    if host.memory_kind is None:
        return {"skipped": "numpy host tier (no host memory kind): no XLA copy to split"}
    hs = SingleDeviceSharding(host.device, memory_kind=host.memory_kind)
    ids = np.arange(1, n + 1, dtype=np.int32)
    pk = jax.block_until_ready(owner.k[:, 1 : n + 1])
    pv = jax.block_until_ready(owner.v[:, 1 : n + 1])
    hpk, hpv = jax.device_put(pk, hs), jax.device_put(pv, hs)
    gather = jax.jit(lambda k, v, i: (k[:, i], v[:, i])).lower(owner.k, owner.v, ids).compile()
    hids = jax.device_put(ids, hs)
    scatter = (
        jax.jit(
            lambda hk, hv, i, a, b: (hk.at[:, i].set(a), hv.at[:, i].set(b)),
            donate_argnums=(0, 1),
            out_shardings=(hs, hs),
        )  # fmt: skip
        .lower(host.k, host.v, hids, hpk, hpv)
        .compile()
    )
    src = np.asarray(pk)
    dst = np.empty_like(src)

    def host_scatter() -> None:
        host.k, host.v = scatter(host.k, host.v, hids, hpk, hpv)
        jax.block_until_ready(host.k)

    def engine() -> None:
        te.issue("d2h", ids.tolist(), ids.tolist())
        te.wait()

    pieces = {
        "raw_device_put": lambda: jax.block_until_ready(
            (jax.device_put(pk, hs), jax.device_put(pv, hs))
        ),
        "engine_copy_out": engine,
        "gather_only": lambda: jax.block_until_ready(gather(owner.k, owner.v, ids)),
        "host_scatter_only": host_scatter,
        "numpy_memcpy": lambda: (np.copyto(dst, src), np.copyto(dst, src)),  # K and V
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for fn in pieces.values():
        fn()  # settle
    for _ in range(repeats):
        for name, fn in pieces.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    nbytes = 2 * pk.nbytes
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "blocks": n,
        "bytes": nbytes,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "gbps": {k: nbytes / v / 1e9 for k, v in med.items()},
        "engine_vs_raw": med["raw_device_put"] / med["engine_copy_out"],
    }


def bench_decode_interference(model: str, repeats: int, copy_blocks: int = 256) -> dict:
    from tokencake.runner import ModelRunner, RowRequest
    from tokencake.runner_config import RunnerConfig

    if model == "default":
        from tokencake.models.hub import resolve_model

        cfg, params, _, _ = resolve_model(None)
    else:
        from tokencake.models.config import tiny_config
        from tokencake.models.weights import random_params

        cfg = tiny_config()
        params = random_params(cfg, 0)
    seqs, ctx = 8, 255
    pages_per_seq = (ctx + 1 + 15) // 16
    num_pages = 1 + seqs * pages_per_seq + copy_blocks
    runner = ModelRunner(
        cfg, params, RunnerConfig(num_pages=num_pages, max_model_len=512, max_num_seqs=seqs)
    )
    host = allocate_host_kv(runner.kv_spec, copy_blocks + 1)
    te = TransferEngine(runner, host, max_bucket=copy_blocks)
    te.warmup()
    rows = [
        RowRequest(
            f"r{i}",
            [1],
            ctx,
            list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)),
            0.0,
            0,
            1.0,
            0,
            0,
        )
        for i in range(seqs)
    ]
    copy_ids = list(range(1 + seqs * pages_per_seq, num_pages))  # pages no row uses
    host_ids = list(range(1, copy_blocks + 1))
    runner.execute(rows)  # compile the decode shape

    def step_time(direction: str | None) -> float:
        times = []
        for _ in range(repeats):
            if direction is not None:
                te.issue(direction, copy_ids, host_ids)
            t0 = time.perf_counter()
            runner.execute(rows)
            times.append(time.perf_counter() - t0)
            te.wait()
        return statistics.median(times)

    base = step_time(None)
    out = {
        "model": model,
        "copy_blocks": copy_blocks,
        "copy_bytes": copy_blocks * runner.kv_spec.bytes_per_page,
        "decode_rows": seqs,
        "decode_ms": base * 1e3,
    }
    for d in ("d2h", "h2d"):
        t = step_time(d)
        out[f"decode_ms_with_{d}_in_flight"] = t * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_transfer.json")
    ap.add_argument("--model", choices=("tiny", "default"), default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"backend={jax.default_backend()} device={jax.devices()[0]}")
    thr = bench_throughput(args.repeats)
    print(f"{'dir':4} {'blocks':>6} {'MiB':>8} {'engine GB/s':>12} {'raw GB/s':>9} {'ratio':>6}")
    for r in thr:
        if "blocks" in r:
            print(
                f"{r['direction']:4} {r['blocks']:>6} {r['bytes'] / 2**20:>8.1f} "
                f"{r['engine_gbps']:>12.2f} {r['raw_device_put_gbps']:>9.2f} {r['ratio']:>6.2f}"
            )
    print("learned bandwidth (GB/s):", thr[-1]["learned_bandwidth_gbps"])
    dec_split = bench_decomposition(max(args.repeats, 7))
    if "skipped" in dec_split:
        print("copy-out split:", dec_split["skipped"])
    else:
        print(f"copy-out of {dec_split['blocks']} blocks, split (median of interleaved rounds):")
        for k, ms in dec_split["median_ms"].items():
            print(f"  {k:18s} {ms:8.2f} ms {dec_split['gbps'][k]:7.2f} GB/s")
        print(f"  engine / raw device_put: {dec_split['engine_vs_raw']:.2f}")
    dec = bench_decode_interference(args.model, args.repeats)
    print(
        f"decode step ({dec['model']} model, {dec['decode_rows']} rows): {dec['decode_ms']:.2f} ms; "
        f"with a {dec['copy_blocks']}-block copy in flight: d2h {dec['decode_ms_with_d2h_in_flight']:.2f} ms, "
        f"h2d {dec['decode_ms_with_h2d_in_flight']:.2f} ms"
    )
    with open(args.out, "w") as f:
        json.dump(
            {
                "throughput": thr,
                "copy_out_split": dec_split,
                "decode": dec,
                "backend": jax.default_backend(),
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
