"""One layer's paged attention on the default model's heads: the reference against the chunked
backend (and chunk sizes), interleaved call by call, with the ratio of medians from this run.

    python bench/bench_attention.py [--chunks 32,64,128] [--iters 15] [--pool-pages 4096]
                                    [--kv-dtypes bfloat16,float16] [--decode-only]

Shapes (rows x query tokens, padded page bucket, live context): decode B=1/8/32 with contexts
in a half-used 32-page bucket (the bench_peer window, 128-255 tokens), B=32 filling its bucket,
B=32 in a 128-page bucket holding ~200-token contexts, and 512-token prefill chunks over 1.5k
and 6k contexts. Each row's pages are scattered over a ``--pool-pages`` pool, as in a running
engine. Every chunked result is checked against the reference before it is timed.
``--kv-dtypes`` also times the first chunk size over pages stored in each given dtype (the
gathered keys and values are widened to float32, as the backend does), to see whether fewer KV
bytes pay; their error against the float32 reference is printed, not checked.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tokencake.models.attention.chunked import chunked_paged_attention
from tokencake.models.attention.reference import reference_paged_attention

HQ, HKV, D, PAGE = 9, 3, 64, 16  # SmolLM2-135M
# (rows, query tokens, bucket pages, (lo, hi) live context)
SHAPES = [
    (1, 1, 32, (128, 256)),
    (8, 1, 32, (128, 256)),
    (32, 1, 32, (128, 256)),
    (32, 1, 32, (480, 512)),
    (32, 1, 128, (150, 250)),
    (1, 512, 128, (1536, 1536)),
    (1, 512, 512, (6144, 6144)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", default="32,64,128", help="chunk_tokens values to time")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--pool-pages", type=int, default=4096)
    ap.add_argument("--kv-dtypes", default="", help="extra page dtypes for the first chunk size")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill shapes")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.pool_pages
    k_pages = jnp.asarray(rng.standard_normal((n, PAGE, HKV, D), np.float32))
    v_pages = jnp.asarray(rng.standard_normal((n, PAGE, HKV, D), np.float32))
    fns = {"reference": jax.jit(functools.partial(reference_paged_attention, scale=D**-0.5))}
    chunks = [int(x) for x in args.chunks.split(",")]
    for c in chunks:
        fns[f"chunked {c}"] = jax.jit(
            functools.partial(chunked_paged_attention, scale=D**-0.5, chunk_tokens=c)
        )
    narrow = {}  # label -> page dtype
    for dt in filter(None, args.kv_dtypes.split(",")):
        label = f"{dt} {chunks[0]}"
        narrow[label] = jnp.dtype(dt)
        fns[label] = fns[f"chunked {chunks[0]}"]
    pages_in = {dt: (k_pages.astype(dt), v_pages.astype(dt)) for dt in set(narrow.values())}
    print(f"{'ms per layer (median)':36s}" + "".join(f"{k:>14s}" for k in fns) + "  best / ref")
    for rows, qn, pages, (lo, hi) in SHAPES:
        if args.decode_only and qn > 1:
            continue
        kv = rng.integers(lo, hi + 1, rows).astype(np.int32)
        tables = rng.integers(1, n, (rows, pages)).astype(np.int32)
        args_ = (
            jnp.asarray(rng.standard_normal((rows, qn, HQ, D), np.float32)),
            k_pages,
            v_pages,
            jnp.asarray(tables),
            jnp.full((rows,), qn, jnp.int32),
            jnp.asarray(kv),
        )
        call_args = {k: args_ for k in fns}
        for name, dt in narrow.items():
            call_args[name] = (args_[0], *pages_in[dt], *args_[3:])
        want = fns["reference"](*args_)
        times: dict[str, list[float]] = {k: [] for k in fns}
        errors = []
        for name, fn in fns.items():
            err = float(jnp.max(jnp.abs(fn(*call_args[name]) - want)))
            if name in narrow:
                errors.append(f"{name}: {err:.1e}")
            elif err > 1e-4:
                raise SystemExit(f"{name} differs from the reference by {err}")
        for _ in range(args.iters):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(*call_args[name]).block_until_ready()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        best = min(v for k, v in med.items() if k != "reference" and k not in narrow)
        label = f"S={rows} Q={qn} bucket {pages}p ctx {lo}-{hi}"
        print(f"{label:36s}" + "".join(f"{v:14.2f}" for v in med.values()) +
              f"{best / med['reference']:12.2f}" + ("  max error " + ", ".join(errors) if errors else ""))  # fmt: skip


if __name__ == "__main__":
    main()
