"""Time ``Scheduler.schedule()`` with 256 running and 1,000 waiting annotated requests.

Target (issue 17 item 4): under 2 ms per call at p99 for every policy (the scheduler must not
be the bottleneck of a step). The simulator executes each plan; after every step the queue is
topped up with fresh annotated requests, so every timed call sees ``--waiting`` waiting
requests (and the running set stays at ``--running`` when the pool allows). Prints median /
p90 / p99 / max per policy and the queue sizes the calls saw; asserts nothing about time.

Output lengths are drawn from ``--max-tokens LO-HI`` (default 16-256), so requests finish a
few per step, as in real traffic. With one fixed length (``--max-tokens 64-64``, the old
benchmark) the first 256 requests finish in lockstep waves of 64 and every wave step admits
64 requests at once; the p99 of that run is the cost of such an admission burst.

    python bench/bench_schedule.py [--policies vllm,tokencake] [--steps 500] [--profile]

``--profile`` runs the timed ``plan()`` calls under cProfile and prints the top functions by
cumulative and by own time for each policy.

For a policy with the Space Scheduler (``tokencake``, ``tokencake-space``) the thread-CPU times
are also split into the calls that refreshed every score (``score_refresh_s`` of engine time
passed) and the others: the p99 of these policies is the slowest refresh call.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.core import Scheduler, SchedulerConfig, StepLoop
from tokencake.scheduler.request import Request
from tokencake.scheduler.sim_executor import SimClock, SimExecutor

POLICIES = "vllm,vllm-offload,continuum,infercept,tokencake,tokencake-space,tokencake-time"


def annotated_metadata(n: int) -> dict:
    """Agent hints of the ``n``-th synthetic request (ten agent types, five depths, joins)."""
    return {"agent_type": f"type{n % 10}", "importance": float(n % 10), "depth": n % 5,
            "application_max_depth": 5, "remaining_depth": 4 - n % 5,
            "join_group": f"g{n % 7}" if n % 3 == 0 else "",
            "application_started_at_s": 1.0 + n % 20, "offload_eligible": True,
            "reusable_prefix": True}  # fmt: skip


class Bench:
    """A scheduler on the simulator, with an annotated request generator to keep it loaded."""

    def __init__(
        self,
        policy: str,
        running: int,
        waiting: int,
        seed: int = 0,
        max_tokens: tuple[int, int] = (16, 256),
    ) -> None:
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.clock = SimClock()
        per_request = -(-(120 + max_tokens[1]) // 16)  # blocks of the longest request
        pool = BlockPool(running * per_request + 64, 16)
        cfg = SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=8192,
                              max_prefill_chunk=512, max_prefill_seqs=64, max_model_len=4096)  # fmt: skip
        self.s = Scheduler(cfg, pool, policy, self.clock, host_pool=HostBlockPool(1024, 16))
        self.loop = StepLoop(self.s, SimExecutor(self.clock))
        self.n = 0
        self.target_running = running
        self.target_waiting = waiting
        self.add(running)
        for _ in range(10 * running):  # admit the running set (admission may pace it)
            if len(self.s.running) >= running:
                break
            plan = self.loop.plan()
            self.loop.update(plan, self.loop.execute(plan))
            self.add(running - len(self.s.running) - len(self.s.waiting))
        self.top_up()

    def add(self, k: int) -> None:
        for _ in range(k):
            n = self.n
            md = annotated_metadata(n)
            prompt = [self.rng.randrange(1, 30000) for _ in range(self.rng.randrange(32, 120))]
            out = self.rng.randint(*self.max_tokens)
            self.s.add_request(Request(f"r{n}", prompt, out, self.clock(), metadata=md))
            self.n += 1

    def top_up(self) -> None:
        """Refill the waiting queue to its target (finished requests left the engine)."""
        self.add(self.target_waiting - len(self.s.waiting))

    def refreshed_at(self) -> float | None:
        """When the Space Scheduler last refreshed every score (None: the policy has none)."""
        space = getattr(self.s.policy, "space", None)
        return None if space is None else space._scored_at

    def step(self, prof: cProfile.Profile | None = None) -> tuple[float, float, int, int]:
        """One timed ``plan()`` (schedule) call: (wall seconds, this thread's CPU seconds,
        running, waiting it saw). The CPU time is the load-robust figure on a shared machine:
        wall time also counts the time other processes held the core. ``prof`` profiles the
        ``plan()`` call alone (not the simulated execution or the queue top-up)."""
        self.top_up()
        running, waiting = len(self.s.running), len(self.s.waiting)
        if prof is not None:
            prof.enable()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        plan = self.loop.plan()
        dt = time.perf_counter() - t0
        dc = time.thread_time() - c0
        if prof is not None:
            prof.disable()
        self.loop.update(plan, self.loop.execute(plan))
        return dt, dc, running, waiting


def pct(sorted_xs: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of an ascending list."""
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--waiting", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--max-tokens", default="16-256", help="output length range LO-HI")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.max_tokens.split("-"))
    for policy in args.policies.split(","):
        b = Bench(policy, args.running, args.waiting, max_tokens=(lo, hi))
        prof = cProfile.Profile() if args.profile else None
        wall, cpu, runs, waits = [], [], [], []
        split: dict[bool, list[float]] = {True: [], False: []}  # refreshed scores -> CPU ms
        for _ in range(args.steps):
            before = b.refreshed_at()
            dt, dc, r, w = b.step(prof)
            if before is not None:
                split[b.refreshed_at() != before].append(1e3 * dc)
            wall.append(1e3 * dt)
            cpu.append(1e3 * dc)
            runs.append(r)
            waits.append(w)
        print(f"{policy:16s} running {min(runs)}-{max(runs)} (median {statistics.median(runs):.0f}) "
              f"waiting {min(waits)}-{max(waits)}", flush=True)  # fmt: skip
        for label, ms in (("wall", sorted(wall)), ("cpu", sorted(cpu))):
            print(f"  schedule() {label:4s} ms: median {statistics.median(ms):7.3f}  "
                  f"p90 {pct(ms, 0.9):7.3f}  p99 {pct(ms, 0.99):7.3f}  max {ms[-1]:7.3f}",
                  flush=True)  # fmt: skip
        for refresh, ms in split.items():
            if ms:
                ms.sort()
                label = "refresh" if refresh else "other"
                print(f"  cpu ms, {label:7s} calls ({len(ms):3d}): median "
                      f"{statistics.median(ms):7.3f}  p90 {pct(ms, 0.9):7.3f}  max {ms[-1]:7.3f}",
                      flush=True)  # fmt: skip
        if prof is not None:
            stats = pstats.Stats(prof)
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
