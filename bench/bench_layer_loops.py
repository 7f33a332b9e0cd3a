"""Decode step time of the model's layer loops (and weight packing) A/B, in one process.

    python bench/bench_layer_loops.py [--loops scan,switch] [--batches 1,8] [--ctx 160]
                                      [--steps 30]

One ``ModelRunner`` per loop over the default model, with the suffixes of
``bench/variants.py`` (``+pack``, ``+nofuse``, ``+in_out``, ``+ladder``, ``+bf16``); every
configuration decodes the same rows in turn, step by step, so a shared machine's load hits
them alike. Prints median step times, the ratio against the first loop, and whether every
loop sampled the same greedy tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository's ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.variants import runner_options
from tokencake.models.hub import resolve_model
from tokencake.runner import ModelRunner, RowRequest
from tokencake.runner_config import RunnerConfig


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--loops", default="scan,switch")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctx", type=int, default=160)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    loops, batches = args.loops.split(","), [int(b) for b in args.batches.split(",")]
    cfg, params, _, _ = resolve_model(None)
    per_seq = -(-(args.ctx + args.steps) // 16)
    runners = {}
    for loop in loops:
        rc = RunnerConfig(num_pages=2 + max(batches) * per_seq, max_model_len=1024,
                          max_num_seqs=max(batches), max_prefill_chunk=256, max_prefill_seqs=1,
                          **runner_options(loop))  # fmt: skip
        runners[loop] = r = ModelRunner(cfg, params, rc)
        for b in batches:
            shape = rc.buckets.group_shape([(args.ctx, 1)] * b, False)
            t = time.perf_counter()
            r.compiled(shape)
            print(f"{loop}: compile {shape} {time.perf_counter() - t:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    times = {(loop, b): [] for loop in loops for b in batches}
    tokens: dict[tuple[int, int], dict[str, list[int]]] = {}
    for b in batches:
        tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(b)]
        prompts = rng.integers(100, 40000, (b, args.ctx)).tolist()
        for r in runners.values():  # the same context in every runner's cache
            for i in range(b):
                for s in range(0, args.ctx, 256):
                    chunk = prompts[i][s : s + 256]
                    r.execute([RowRequest(f"s{i}", chunk, s, tables[i], 0.0, 0, 1.0, 0, 0)])
        for k in range(args.steps):
            for loop, r in runners.items():
                rows = [RowRequest(f"s{i}", [7 + i], args.ctx + k, tables[i], 0.0, 0, 1.0, 0, 0)
                        for i in range(b)]  # fmt: skip
                t = time.perf_counter()
                out = r.execute(rows)
                times[(loop, b)].append(time.perf_counter() - t)
                tokens.setdefault((b, k), {})[loop] = [out[f"s{i}"].token for i in range(b)]
    same = all(len({tuple(v) for v in d.values()}) == 1 for d in tokens.values())
    print(f"identical greedy tokens across loops: {same}")
    for b in batches:
        base = float(np.median(times[(loops[0], b)]))
        for loop in loops:
            med = float(np.median(times[(loop, b)]))
            print(f"B={b:<3d} {loop:12s} median {med * 1e3:8.2f} ms  {b / med:7.1f} tok/s  "
                  f"step time vs {loops[0]}: {med / base:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
