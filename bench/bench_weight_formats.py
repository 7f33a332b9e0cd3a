"""Weight-only formats on this backend: M=1 dots with f32, bf16 and int8 weights (issue 17 item 1).

Twenty 576x1536 matrices (SmolLM2-135M's MLP shape) each multiplied by one f32 row, as a
batch-1 decode step does; every format computes in f32. Rounds are interleaved (each round
times every format once) so load from other processes hits them alike; the table gives the
median time, its ratio to f32 and the max abs error against the f32 result::

    python bench/bench_weight_formats.py [--rounds 31]

int8 uses per-output-channel scales (symmetric, max-abs / 127). A format pays only if its
dot reads the narrow weights in place: a backend that first converts the whole matrix to f32
reads and writes more bytes than the f32 dot.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def formats(rng: np.random.Generator, n: int = 20) -> tuple[jax.Array, dict[str, Callable]]:
    ws = [rng.standard_normal((576, 1536)).astype(np.float32) * 0.02 for _ in range(n)]
    x = jnp.asarray(rng.standard_normal((1, 576)).astype(np.float32))
    scales = [np.abs(w).max(0) / 127 for w in ws]
    f32 = [jnp.asarray(w) for w in ws]
    bf16 = [jnp.asarray(w, jnp.bfloat16) for w in ws]
    i8 = [jnp.asarray(np.round(w / s).astype(np.int8)) for w, s in zip(ws, scales, strict=True)]
    sc = [jnp.asarray(s) for s in scales]

    @jax.jit
    def dot_f32(x, ws):
        return sum(jnp.dot(x, w) for w in ws)

    @jax.jit
    def dot_bf16(x, ws):
        return sum(jnp.dot(x, w.astype(jnp.float32)) for w in ws)

    @jax.jit
    def dot_int8(x, qs, ss):
        return sum(jnp.dot(x, q.astype(jnp.float32)) * s for q, s in zip(qs, ss, strict=True))

    return x, {
        "f32": lambda: dot_f32(x, f32),
        "bf16 weights": lambda: dot_bf16(x, bf16),
        "int8 weights": lambda: dot_int8(x, i8, sc),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=31)
    args = ap.parse_args()
    _, fns = formats(np.random.default_rng(0))
    ref = np.asarray(fns["f32"]())
    err = {k: float(np.abs(np.asarray(f()) - ref).max()) for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f().block_until_ready()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["f32"])
    print(f"backend {jax.default_backend()}, {args.rounds} interleaved rounds")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"{k:13s} median {1e3 * m:8.3f} ms  {m / base:5.2f}x f32  max abs err {err[k]:.2e}")


if __name__ == "__main__":
    main()
