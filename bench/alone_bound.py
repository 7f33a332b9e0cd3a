"""A lower bound on total E2E that no scheduler beats at a preset's compute (up to shared
prefixes, below): each application simulated alone in the engine, and the latest
``arrival + latency alone`` over them.

    python -m bench.alone_bound --workload multi-turn --apps 10 --rates 0.2,1.0 --seeds 1-5 \\
        --poisson

An application alone has every block and every step to itself, so sharing the engine can only
delay it (the simulator's step time grows with the batch), save for the prefix another
application may leave cached for it (a shared system prompt: a few hundred tokens). Where
total E2E is one long chain's finish (multi-turn's longest session), the distance between
this bound and the no-pressure floor (KV x10, ``bench.run``) is what batching costs that
chain, and the distance from the floor to a policy's figure is what memory costs it
(``bench/RESULTS.md``, seventeenth round).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from bench.presets import make_preset
from bench.run import run_sim
from bench.seed_sweep import WORKLOADS, cell_workload, parse_seeds
from bench.workload import Workload


def alone_bound(wl: Workload, policy: str, preset: Any, seed: int = 0) -> tuple[float, str]:
    """``(bound in s, the application that sets it)``: the latest arrival (from the first
    one) plus that application's latency when it runs alone under ``policy``."""
    first = min(a.arrival_s for a in wl.applications)
    best = (-1.0, "")
    for app in wl.applications:
        alone = dataclasses.replace(wl, applications=[dataclasses.replace(app, arrival_s=0.0)])
        _, res, _ = run_sim(alone, policy, preset, seed=seed)
        best = max(best, (app.arrival_s - first + res.apps[0].latency_s, app.app_id))
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="multi-turn", choices=sorted(WORKLOADS))
    ap.add_argument("--apps", type=int, default=10)
    ap.add_argument("--rates", default="0.2,1.0")
    ap.add_argument("--seeds", default="1-5")
    ap.add_argument("--policy", default="tokencake")
    ap.add_argument("--preset", default="a800-qwen2.5-14b")
    ap.add_argument("--poisson", action="store_true", help="Poisson arrivals (else i / rate)")
    args = ap.parse_args(argv)
    preset = make_preset(args.preset)
    for rate in (float(r) for r in args.rates.split(",")):
        for seed in parse_seeds(args.seeds):
            wl = cell_workload(args.workload, rate, seed, args.apps, preset, args.poisson)
            bound, app = alone_bound(wl, args.policy, preset, seed)
            print(f"{args.workload} rate {rate} seed {seed}: bound {bound:.1f} s (application "
                  f"{app})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
