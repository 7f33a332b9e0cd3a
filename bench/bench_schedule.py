"""Time ``Scheduler.schedule()`` with 256 running and 1000 waiting requests on the simulator.

Target: under 2 ms per call (the scheduler must not be the bottleneck of a step). Prints the
figure per policy; asserts nothing about time.

    python bench/bench_schedule.py [--policies vllm,tokencake] [--steps 200]
"""

from __future__ import annotations

import argparse
import random
import time

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.core import Scheduler, SchedulerConfig, StepLoop
from tokencake.scheduler.request import Request
from tokencake.scheduler.sim_executor import SimClock, SimExecutor


def build(policy: str, running: int, waiting: int, seed: int = 0) -> tuple[Scheduler, SimExecutor]:
    rng = random.Random(seed)
    clock = SimClock()
    pool = BlockPool(running * 12 + 64, 16)
    cfg = SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=8192, max_prefill_chunk=512,
                          max_prefill_seqs=64, max_model_len=4096)  # fmt: skip
    s = Scheduler(cfg, pool, policy, clock, host_pool=HostBlockPool(1024, 16))
    ex = SimExecutor(clock)
    n = 0

    def add(k: int) -> None:
        nonlocal n
        for _ in range(k):
            md = {"agent_type": f"type{n % 10}", "importance": float(n % 10), "depth": n % 5,
                  "application_max_depth": 5, "remaining_depth": 4 - n % 5,
                  "join_group": f"g{n % 7}" if n % 3 == 0 else "",
                  "application_started_at_s": 1.0 + n % 20, "offload_eligible": True,
                  "reusable_prefix": True}  # fmt: skip
            prompt = [rng.randrange(1, 30000) for _ in range(rng.randrange(32, 120))]
            s.add_request(Request(f"r{n}", prompt, 64, clock(), metadata=md))
            n += 1

    add(running)
    while len(s.running) < running:  # admit the running set (full-future admission may pace it)
        plan = s.schedule()
        s.update(plan, ex.execute(plan))
        if not plan.chunks and not s.running:
            break
    add(waiting)
    return s, ex


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--policies", default="vllm,tokencake,tokencake-space,tokencake-time,infercept,continuum"
    )
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--waiting", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    for policy in args.policies.split(","):
        s, ex = build(policy, args.running, args.waiting)
        loop = StepLoop(s, ex)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            plan = loop.plan()
            times.append(time.perf_counter() - t0)
            loop.update(plan, loop.execute(plan))
        times.sort()
        print(f"{policy:16s} running={len(s.running):4d} waiting={len(s.waiting):5d} "
              f"schedule() median {1e3 * times[len(times) // 2]:.3f} ms  p90 {1e3 * times[int(len(times) * 0.9)]:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
