"""The cyclic garbage collector's pauses in a serving process, before and after the start-up heap
is frozen (``tokencake/gc_heap.py``, what ``tokencake serve`` does after its warm-up).

    python bench/bench_gc.py [--model PATH] [--requests 32] [--max-tokens 32] [--rounds 5] [--warmup]

Loads the engine in this process (the default model unless ``--model``), serves one batch of
requests so the heap holds what serving adds, then, with the heap as it is:

* times ``gc.collect(g)`` for each generation (median of ``--rounds``) and counts the tracked
  objects: a full pass is what an automatic oldest-generation collection costs;
* serves the same batch again and records every automatic collection that ran during it
  (``gc.callbacks``): how many per generation and the longest pause;

then freezes the heap and repeats both. Prints a table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from tokencake.gc_heap import freeze_startup_heap
from tokencake.llm import LLM
from tokencake.sampling_params import SamplingParams


class Pauses:
    """Every automatic collection while attached: generation -> pause seconds."""

    def __init__(self) -> None:
        self.by_gen: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.by_gen[info["generation"]].append(time.perf_counter() - self._t0)


def full_pass_ms(rounds: int) -> dict[int, float]:
    """Median ms of an explicit collection of each generation (and the ones below it)."""
    out = {}
    for g in (0, 1, 2):
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            gc.collect(g)
            ts.append(time.perf_counter() - t0)
        out[g] = 1e3 * statistics.median(ts)
    return out


def serve(llm: LLM, n: int, max_tokens: int) -> Pauses:
    """One batch of ``n`` requests with the automatic collections recorded."""
    prompts = [f"Request {i}: list three facts about the number {i}." for i in range(n)]
    pauses = Pauses()
    gc.callbacks.append(pauses)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    finally:
        gc.callbacks.remove(pauses)
    return pauses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", action="store_true", help="compile every step shape first")
    args = ap.parse_args()
    llm = LLM(args.model, warmup=args.warmup)
    serve(llm, args.requests, args.max_tokens)  # compiles what the batch needs
    rows = []
    for label in ("as loaded", "frozen"):
        if label == "frozen":
            t0 = time.perf_counter()
            n = freeze_startup_heap()
            print(f"froze {n:,} objects in {1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)
        tracked = sum(len(gc.get_objects(g)) for g in range(3))
        full = full_pass_ms(args.rounds)
        p = serve(llm, args.requests, args.max_tokens)
        rows.append((label, tracked, full, p))
    print(f"\n{args.requests} requests x {args.max_tokens} tokens; collection ms "
          f"(explicit: median of {args.rounds}; automatic: during one batch)")  # fmt: skip
    print(
        "| heap | tracked objects | gen0 | gen1 | full (gen2) | automatic collections "
        "gen0 / gen1 / gen2 | longest automatic pause |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, tracked, full, p in rows:
        counts = " / ".join(str(len(p.by_gen[g])) for g in (0, 1, 2))
        longest = max((x for v in p.by_gen.values() for x in v), default=0.0)
        print(f"| {label} | {tracked:,} | {full[0]:.2f} | {full[1]:.2f} | {full[2]:.1f} | "
              f"{counts} | {1e3 * longest:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
