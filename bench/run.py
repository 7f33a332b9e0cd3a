"""Compare scheduling policies on one multi-agent workload.

    python -m bench.run --workload code-writer --apps 24 --rate 0.05,0.1,0.2,0.5,1.0 \\
        --policies vllm,tokencake --executor sim --preset a800-qwen2.5-14b --out runs/a800
    python -m bench.run --workload code-writer --apps 4 --rate 0.5 --context-scale 0.06 \\
        --output-scale 0.08 --tool-time-scale 0.25 --policies vllm,tokencake \\
        --executor real,sim --preset local --out runs/local
    python -m bench.run --workload authors --apps 2 --max-context-chars 400 --executor http \\
        --url http://localhost:8000 --policies tokencake

``--workload`` is a generator (``code-writer``, ``deep-research``, ``multi-turn``), ``authors``
(the authors' file, scaled with ``--apps/--max-context-chars/--max-tokens-cap/
--tool-time-scale/--tool-noise``) or a path to a workload JSON (``bench/WORKLOAD_FORMAT.md``);
a shaping flag a workload does not use is refused (``SHAPING_FLAGS``). Every policy
runs the same workload with the same seed (identical prompts, tool durations and noise).
Several rates make a sweep. Executors:

* ``sim`` — the scheduler core on a virtual clock with ``--preset`` step times;
* ``real`` — the in-process engine with the default model on the wall clock, configured by
  the ``local`` preset (``bench/local_preset.json``: KV pool, batch limits);
* ``http`` — a running server (``--url``) through :mod:`tokencake.runtime` (client-side
  latencies only; the server's policy is whatever it was started with);
* ``real,sim`` — both, plus the simulator's error against the engine per policy (how the
  ``local`` preset is validated). Before and after each real run the calibration's mix of
  steps is timed again (``bench.speed_check``, ~16 s each, plus about a minute once to
  compile it) and that policy's simulation is priced at the machine's speed of the moment,
  not the calibration day's (``--no-speed-check``: as calibrated). The report gives both
  errors.

Writes ``results.json``, ``report.md`` and PNG plots to ``--out``.

Real-engine sizing: the local preset's pool (``num_pages``) is set from the workload so that
about two and a half of the largest application contexts fit at once (the authors' pool holds
about five 9k-token contexts of 24 applications arriving together; ours runs 4-6 applications),
so concurrent applications contend for KV while no single call exceeds the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.driver import Driver, EngineBackend, RunResult, SimBackend, filler_tokens
from bench.presets import describe, local_engine_kwargs, make_preset, make_real_engine
from bench.report import Collector, summarize, write_reports
from bench.speed_check import SpeedCheck
from bench.workload import CLIENTS, Workload

#: The authors' native vLLM and combined (agent_offload) total E2E per rate (digest §7.2).
AUTHORS_BASE_E2E = {0.05: 875.74, 0.1: 940.76, 0.2: 938.79, 0.5: 938.99, 1.0: 960.44}
AUTHORS_COMBINED_E2E = {0.05: 676.86, 0.1: 671.28, 0.2: 640.45, 0.5: 648.05, 1.0: 631.77}

GENERATOR_NAMES = {
    "code-writer": "code_writer",
    "deep-research": "deep_research",
    "multi-turn": "multi_turn",
    "mixed": "mixed",  # code-writer apps + plain chat traffic (bench/mixed.py)
}


#: Workload-shaping flags: (argument name, its default, the kinds of workload that use it).
#: A flag set on a workload that does not use it is refused, never silently ignored.
SHAPING_FLAGS = {
    "--poisson": ("poisson", False, {"generator"}),
    "--context-scale": ("context_scale", 1.0, {"generator"}),
    "--output-scale": ("output_scale", 1.0, {"generator"}),
    "--tool-time-scale": ("tool_time_scale", 1.0, {"generator", "authors"}),
    "--tool-noise": ("tool_noise", 0.0, {"generator", "authors"}),
    "--max-context-chars": ("max_context_chars", None, {"authors"}),
    "--max-tokens-cap": ("max_tokens_cap", None, {"authors"}),
}


def refuse_unused_flags(args: argparse.Namespace, kind: str) -> None:
    """Exit with a message naming every shaping flag set for a ``kind`` of workload
    (``generator``, ``authors`` or ``file``) that does not use it."""
    unused = [flag for flag, (attr, default, kinds) in SHAPING_FLAGS.items()
              if kind not in kinds and getattr(args, attr) != default]  # fmt: skip
    if unused:
        what = {"generator": "a generated workload", "authors": "the authors' workload",
                "file": "a workload file (its arrivals, texts and tools are the file's)"}[kind]  # fmt: skip
        raise SystemExit(f"{', '.join(unused)}: not defined for {what}")


def build_workload(
    args: argparse.Namespace, rate: float | None, max_model_len: int | None = None
) -> Workload:
    """The workload for one rate (same seed for every policy); multi-turn sessions end at
    ``max_model_len`` (the preset's) when given."""
    from bench.generators import make_workload

    name = args.workload
    if name == "authors":
        refuse_unused_flags(args, "authors")
        kw: dict[str, Any] = {
            "tool_time_scale": args.tool_time_scale,
            "tool_noise": args.tool_noise,
        }
        if args.apps:
            kw["num_apps"] = args.apps
        if args.max_context_chars:
            kw["max_context_chars"] = args.max_context_chars
        if args.max_tokens_cap:
            kw["max_tokens_cap"] = args.max_tokens_cap
        kw["arrival_spacing_s"] = None if not rate else 1.0 / rate
        return make_workload("authors", **kw)
    if name in GENERATOR_NAMES or name in GENERATOR_NAMES.values():
        refuse_unused_flags(args, "generator")
        gen = GENERATOR_NAMES.get(name, name)
        kw = {
            "seed": args.seed,
            "poisson": args.poisson,
            "context_scale": args.context_scale,
            "output_scale": args.output_scale,
            "tool_time_scale": args.tool_time_scale,
            "tool_noise": args.tool_noise,
        }
        if args.apps:
            kw["num_apps"] = args.apps
        if rate:
            kw["arrival_rate"] = rate
        if gen == "multi_turn" and max_model_len:
            kw["max_context_tokens"] = max_model_len
        return make_workload(gen, **kw)
    refuse_unused_flags(args, "file")
    wl = Workload.from_json(name)
    if args.apps:
        wl = Workload(
            name=wl.name, seed=wl.seed, description=wl.description, metadata=wl.metadata,
            applications=wl.sorted_by_arrival()[: args.apps],
        )  # fmt: skip
    return wl


# ---- one policy ---------------------------------------------------------------------------------
def split_policy(spec: str) -> tuple[str, str | None]:
    """``policy[@client]``: ``tokencake@tool-calling`` runs every application as a plain
    tool-calling client (no hints, no events); no suffix: each application's own ``client``."""
    policy, _, client = spec.partition("@")
    if client and client not in CLIENTS:
        raise SystemExit(f"unknown client {client!r} in {spec!r}; use one of {', '.join(CLIENTS)}")
    return policy, client or None


def run_sim(
    wl: Workload, policy: str, preset: Any, *, seed: int = 0, progress: Any = None,
    sample_s: float | None = None, client: str | None = None,
) -> tuple[dict[str, Any], RunResult, Collector]:  # fmt: skip
    """One policy on the simulator; returns (metrics, raw result, collector). ``client``
    overrides every application's client (``annotated`` / ``tool-calling``)."""
    be = SimBackend(policy, preset, vocab_size=preset.vocab_size)
    horizon = max(a.arrival_s for a in wl.applications) + 60.0
    col = Collector(be, sample_s=sample_s or max(0.05, horizon / 400))
    drv = Driver(
        wl, be, seed=seed, observe=col.observe,
        on_progress=None if progress is None else progress.update,
        idle_quantum_s=max(preset.step.idle, 1e-3), client=client,
    )  # fmt: skip
    col.start(be.now())
    res = drv.run()
    col.observe(be.now())
    return summarize(res, col), res, col


def run_real(
    wl: Workload, policy: str, *, model: Any = None, engine_kwargs: dict | None = None,
    seed: int = 0, progress: Any = None, max_wall_s: float | None = None,
    sample_s: float = 0.25, client: str | None = None,
) -> tuple[dict[str, Any], RunResult, Collector]:  # fmt: skip
    """One policy on the real in-process engine (wall clock); ``client`` as for run_sim."""
    engine = make_real_engine(policy, model, engine_kwargs)
    be = EngineBackend(engine, policy)
    try:
        be.step_model = make_preset("local").step
    except Exception:  # no calibrated preset: skip the step-model check
        be.step_model = None
    col = Collector(be, sample_s=sample_s)
    drv = Driver(
        wl, be, seed=seed, observe=col.observe,
        on_progress=None if progress is None else progress.update,
        idle_quantum_s=0.002, max_wall_s=max_wall_s, client=client,
    )  # fmt: skip
    col.start(be.now())
    res = drv.run()
    col.observe(be.now())
    engine.sync_transfers()
    row = summarize(res, col)
    row["step_wall_s"] = be.step_wall_s  # time inside engine.step() for non-empty steps
    row["step_pred_s"] = be.step_pred_s  # the local preset's prediction for the same plans
    # steps with prefill and decode rows: one fused call, or two (fused_steps off, or a mix
    # outside the fused family)
    row["mixed_steps_fused"] = engine.runner.fused_counts["fused"]
    row["mixed_steps_unfused"] = engine.runner.fused_counts["unfused"]
    return row, res, col


def _filler_text(n: int, key: str) -> str:
    """About ``n`` tokens of deterministic text (one short word per token)."""
    return "".join(f" w{t % 997}" for t in filler_tokens(n, key, 10**6))


def workload_apps(wl: Workload, seed: int = 0) -> list[tuple[Any, float]]:
    """Convert a workload to runtime :class:`~tokencake.app.App` s (for the HTTP path).

    Input nodes become the application's system prompt, collect nodes (local joins) are
    dropped and their successors wait on what the collect waited on (a collect sink simply
    ends the application), synthetic lengths become filler words, and tools
    sleep their true duration (with the driver's seeded noise) before returning the result.
    The runtime derives the wire metadata from the graph itself.
    """
    from tokencake.app import App, FuncNode

    out = []
    for a in wl.sorted_by_arrival():
        inputs = [n for n in a.nodes if n.kind == "input"]
        system = "".join(
            n.prompt_text or _filler_text(n.prompt_tokens or 0, f"{seed}/{a.app_id}/{n.id}")
            for n in inputs
        )
        app = App(f"app-{a.app_id}", system_prompt=system)
        # predecessors as runtime agents: inputs vanish, a collect stands for its own deps
        agents_of: dict[str, list[str]] = {n.id: [] for n in inputs}

        def after(deps: Sequence[str], agents_of: dict[str, list[str]] = agents_of) -> list[str]:
            return list(dict.fromkeys(x for d in deps for x in agents_of.get(d, [d])))

        for nid in a.topological_order():
            n = a.node(nid)
            if n.kind == "input":
                continue
            if n.kind == "collect":
                agents_of[nid] = after(n.deps)
                continue
            own = n.prompt_text or _filler_text(n.prompt_tokens or 0, f"{seed}/{a.app_id}/{nid}")
            tool = None
            if n.tool is not None:
                t = n.tool
                res = t.result_text or _filler_text(
                    t.result_tokens or 0, f"{seed}/{a.app_id}/{nid}/t"
                )
                dur = Driver.tool_duration_of(seed, a.app_id, n)

                async def fn(call: Any, dur: float = dur, res: str = res) -> str:
                    await asyncio.sleep(dur)
                    return res

                est = t.estimate_s if t.estimate_s else None
                tool = FuncNode(t.kind, fn, predict_time=est)
            app.agent(
                nid, n.agent_type, own, max_tokens=n.max_tokens, importance=n.importance,
                tool=tool, after=after(n.deps),
                memory_weight=float(n.metadata.get("memory_weight", 1.0)),
            )  # fmt: skip
        out.append((app, a.arrival_s))
    return out


def run_http(wl: Workload, url: str, *, seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """Run the workload against a server through :mod:`tokencake.runtime` (client metrics)."""
    from tokencake.runtime import HTTPTarget, Runtime

    async def main() -> list[tuple[float, float, float]]:
        async with HTTPTarget(url) as target:
            rt = Runtime(target)
            t0 = time.time()

            async def one(app: Any, arrival: float) -> tuple[float, float, float]:
                await asyncio.sleep(max(0.0, t0 + arrival - time.time()))
                r = await rt.run(app, start_offset_s=arrival)
                if progress is not None:
                    progress.update(len(r.nodes))
                return arrival, r.started_at - t0, r.finished_at - t0

            return await asyncio.gather(*(one(a, t) for a, t in workload_apps(wl, seed)))

    spans = asyncio.run(main())
    lat = sorted(f - a for a, _, f in spans)
    return {
        "policy": "server",
        "apps": len(spans),
        "total_e2e_s": max(f for _, _, f in spans) - min(a for a, _, _ in spans),
        "app_latency_mean_s": sum(lat) / len(lat),
        "app_latency_p50_s": lat[len(lat) // 2],
        "app_latency_p95_s": lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)],
    }


# ---- main ------------------------------------------------------------------------------------------
def _rates(s: str | None) -> list[float | None]:
    return [None] if not s else [float(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workload", default="code-writer")
    ap.add_argument("--apps", type=int, default=None)
    ap.add_argument("--rate", default=None, help="apps/s; comma-separated for a sweep")
    ap.add_argument("--poisson", action="store_true")
    ap.add_argument("--context-scale", type=float, default=1.0)
    ap.add_argument("--output-scale", type=float, default=1.0)
    ap.add_argument("--tool-time-scale", type=float, default=1.0)
    ap.add_argument("--tool-noise", type=float, default=0.0)
    ap.add_argument("--max-context-chars", type=int, default=None, help="authors only")
    ap.add_argument("--max-tokens-cap", type=int, default=None, help="authors only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default="vllm,tokencake")
    ap.add_argument("--executor", default="sim", help="sim, real, http or real,sim")
    ap.add_argument("--preset", default="a800-qwen2.5-14b")
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--max-wall-s", type=float, default=600.0, help="per real-engine run")
    ap.add_argument("--out", default="runs/latest")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the no-pressure floor run (vllm with the KV pool x10) of simulator reports",
    )
    ap.add_argument(
        "--no-speed-check",
        action="store_true",
        help="real,sim: price the simulation as calibrated, not at the machine's speed measured "
        "after each real run",
    )
    args = ap.parse_args(argv)

    from tqdm import tqdm

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    executors = [e.strip() for e in args.executor.split(",")]
    speed_check = {"real", "sim"} <= set(executors) and not args.no_speed_check
    if speed_check:  # each policy's real run first: its simulation is priced at that speed
        executors.sort(key=lambda e: e != "real")
    rates = _rates(args.rate)
    preset = make_preset("local" if "real" in executors else args.preset)
    workloads = {r: build_workload(args, r, preset.max_model_len) for r in rates}
    n_calls = sum(w.num_llm_calls for w in workloads.values())
    total = n_calls * (1 if executors == ["http"] else len(policies) * len(executors))
    bar = tqdm(total=total, unit="call", disable=args.no_progress, dynamic_ncols=True)
    model = None
    checker: SpeedCheck | None = None
    rows: list[dict[str, Any]] = []
    timelines: dict[str, list[dict[str, float]]] = {}
    timed_out: list[str] = []
    for rate, wl in workloads.items():
        if executors == ["http"]:
            bar.set_description(f"rate={rate} http")
            row = run_http(wl, args.url, seed=args.seed, progress=bar)
            rows.append({"rate": rate, "executor": "http", **row})
            continue
        for spec in policies:
            policy, client = split_policy(spec)
            speed: float | None = None
            for ex in executors:
                bar.set_description(f"rate={rate} {spec} {ex}")
                if ex == "sim":
                    priced = preset if speed is None else preset.at_speed(speed)
                    row, _, col = run_sim(wl, policy, priced, seed=args.seed, progress=bar,
                                          client=client)  # fmt: skip
                    if speed is not None:
                        row["speed_factor"] = speed
                        row["total_e2e_calibrated_s"] = run_sim(
                            wl, policy, preset, seed=args.seed, client=client
                        )[0]["total_e2e_s"]
                elif ex == "real":
                    if model is None:
                        from tokencake.models.hub import resolve_model

                        mc, params, tok, _ = resolve_model(None)
                        model = (mc, params, tok)
                    if speed_check and checker is None:
                        checker = SpeedCheck(preset, local_engine_kwargs(), model)
                    before = checker.measure() if checker else None
                    try:
                        row, _, col = run_real(wl, policy, model=model, seed=args.seed,
                                               progress=bar, max_wall_s=args.max_wall_s,
                                               client=client)  # fmt: skip
                    except TimeoutError as e:  # report it and go on with the other policies
                        bar.write(f"rate={rate} {spec:16s} {ex:4s} TIMED OUT: {e}")
                        timed_out.append(f"rate={rate} {spec} {ex}: {e}")
                        continue
                    if checker is not None:  # the machine's speed around this run
                        after = checker.measure()
                        speed = math.sqrt(before * after)
                        row.update(speed_factor=speed, speed_before=before, speed_after=after)
                else:
                    raise SystemExit(f"unknown executor {ex!r}; use sim, real, http or real,sim")
                rows.append({"rate": rate, "executor": ex, **row, "policy": spec})
                timelines[f"rate={rate} {spec} {ex}"] = col.timeline
                bar.write(
                    f"rate={rate} {spec:16s} {ex:4s} total E2E {row['total_e2e_s']:8.1f} s  "
                    f"app mean {row['app_latency_mean_s']:7.1f} s  "
                    f"eff. KV util {row['effective_kv_utilization']:.1%}  "
                    f"wall {row['wall_s']:.0f} s"
                )
        if "sim" in executors and not args.no_floor:
            bar.set_description(f"rate={rate} floor")
            row, _, _ = run_sim(wl, "vllm", floor_preset(preset), seed=args.seed)
            rows.append({"rate": rate, "executor": "sim", **row, "policy": FLOOR})
            bar.write(f"rate={rate} {FLOOR}: total E2E {row['total_e2e_s']:8.1f} s")
    bar.close()
    if checker is not None:
        checker.close()
    extra = comparison_notes(rows, executors, preset.name, args)
    if timed_out:
        extra += "\n## Timed out (no row)\n\n" + "\n".join(f"- {t}" for t in timed_out) + "\n"
    meta = {
        "title": f"{args.workload} on {'/'.join(executors)} ({preset.name})",
        "args": vars(args),
        "preset": describe(preset),
        "workload": {
            str(r): {"name": w.name, "apps": len(w.applications), "llm_calls": w.num_llm_calls}
            for r, w in workloads.items()
        },  # fmt: skip
    }
    write_reports(Path(args.out), rows, timelines, meta, extra)
    print(extra)
    print(f"reports written to {args.out}")
    return rows


#: Name of the no-pressure floor row: ``vllm`` with ten times the device KV pool.
FLOOR = "floor (vllm, KV x10)"
FLOOR_FACTOR = 10


def floor_preset(preset: Any) -> Any:
    """``preset`` with ``FLOOR_FACTOR`` times the device KV blocks (same compute, no memory
    pressure): what no KV policy can beat at this compute."""
    import dataclasses

    return dataclasses.replace(
        preset,
        name=f"{preset.name} (KV x{FLOOR_FACTOR})",
        num_blocks=preset.num_blocks * FLOOR_FACTOR,
    )


def floor_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: each policy's total E2E and app mean as multiples of the floor's."""
    floors = {r["rate"]: r for r in rows if r["policy"] == FLOOR}
    if not floors:
        return []
    out = ["## No-pressure floor (same workload and compute, KV pool x10)", "",
           "| rate | policy | total E2E (s) | floor (s) | x floor | app mean (s) | floor app mean (s) |"
           " x floor |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        f = floors.get(r["rate"])
        if f is None or r["policy"] == FLOOR or r["executor"] != "sim":
            continue
        out.append(
            f"| {r['rate']} | {r['policy']} | {r['total_e2e_s']:.1f} | {f['total_e2e_s']:.1f} | "
            f"{r['total_e2e_s'] / f['total_e2e_s']:.2f} | {r['app_latency_mean_s']:.1f} | "
            f"{f['app_latency_mean_s']:.1f} | {r['app_latency_mean_s'] / f['app_latency_mean_s']:.2f} |"
        )
    return [*out, ""]


def starvation_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: chat calls' mean and P95 latency per policy, as multiples of ``vllm``'s in
    the same run (the no-starvation bound of issue 12 is 1.2x)."""
    kinds = sorted({k[: -len("_latency_mean_s")] for r in rows for k in r
                    if k.startswith("chat-") and k.endswith("_latency_mean_s")})  # fmt: skip
    if not kinds:
        return []
    by = {(r["rate"], r["policy"], r["executor"]): r for r in rows}
    out = ["## Starvation: chat calls next to agent applications (vs vllm, same run)", "",
           "| rate | policy | traffic | calls | mean (s) | x vllm | P95 (s) | x vllm |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        b = by.get((r["rate"], "vllm", r["executor"]))
        for k in kinds:
            if f"{k}_latency_mean_s" not in r or r["policy"] == FLOOR:
                continue
            m, p = r[f"{k}_latency_mean_s"], r[f"{k}_latency_p95_s"]
            bm = b[f"{k}_latency_mean_s"] if b else math.nan
            bp = b[f"{k}_latency_p95_s"] if b else math.nan
            out.append(f"| {r['rate']} | {r['policy']} | {k} | {r[f'{k}_calls']} | {m:.2f} | "
                       f"{m / bm:.2f} | {p:.2f} | {p / bp:.2f} |")  # fmt: skip
    return [*out, ""]


def comparison_notes(
    rows: list[dict[str, Any]], executors: list[str], preset: str, args: argparse.Namespace
) -> str:
    """Markdown: tokencake vs vllm per rate; sim error vs real; vllm vs the authors' totals."""
    out = []
    by = {(r["rate"], r["policy"], r["executor"]): r for r in rows}
    lines = []
    for (rate, pol, ex), r in by.items():
        b = by.get((rate, "vllm", ex))
        if b and pol not in ("vllm", FLOOR):
            red = 1 - r["total_e2e_s"] / b["total_e2e_s"]
            du = r["effective_kv_utilization"] - b["effective_kv_utilization"]
            lines.append(f"| {rate} | {ex} | {pol} | {red:+.1%} | {du * 100:+.1f} pp |")
    if lines:
        out += ["## E2E reduction vs vllm", "",
                "| rate | executor | policy | total E2E reduction | eff. KV util change |",
                "|---|---|---|---|---|", *lines, ""]  # fmt: skip
    inferred = []
    for (rate, pol, ex), r in by.items():
        base_pol, client = split_policy(pol)
        a = by.get((rate, base_pol, ex))
        v = by.get((rate, "vllm", ex))
        if client == "tool-calling" and a:
            vs_v = f"{1 - r['total_e2e_s'] / v['total_e2e_s']:+.1%}" if v else "—"
            inferred.append(
                f"| {rate} | {ex} | {base_pol} | {a['total_e2e_s']:.1f} | {r['total_e2e_s']:.1f} | "
                f"{r['total_e2e_s'] / a['total_e2e_s'] - 1:+.1%} | {vs_v} |"
            )
    if inferred:
        out += ["## Inferred lifecycles (tool-calling clients) vs annotated", "",
                "| rate | executor | policy | annotated E2E (s) | inferred E2E (s) |"
                " inferred vs annotated | inferred E2E reduction vs vllm |",
                "|---|---|---|---|---|---|---|", *inferred, ""]  # fmt: skip
    out += floor_notes(rows)
    out += starvation_notes(rows)
    if "real" in executors and "sim" in executors:
        out += ["## Simulator (local preset) vs real engine", "",
                "Speed: the calibration's mix of steps timed again before and after the real run, "
                "now / calibrated (`bench.speed_check`, geometric mean of the two); the simulation "
                "is priced at it. \"As calibrated\": the same simulation at the calibration "
                "day's prices.", "",
                "| rate | policy | real E2E (s) | sim E2E (s) | error | speed | as calibrated (s) |"
                " error | real app mean | sim app mean | real steps (s) | model for them (s) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for (rate, pol, ex), r in by.items():
            s = by.get((rate, pol, "sim"))
            if ex == "real" and s:
                real = r["total_e2e_s"]
                cal = s.get("total_e2e_calibrated_s", s["total_e2e_s"])
                speed = s.get("speed_factor")
                out.append(
                    f"| {rate} | {pol} | {real:.1f} | {s['total_e2e_s']:.1f} | "
                    f"{s['total_e2e_s'] / real - 1:+.1%} | "
                    f"{'-' if speed is None else f'x{speed:.3f}'} | {cal:.1f} | "
                    f"{cal / real - 1:+.1%} | "
                    f"{r['app_latency_mean_s']:.1f} | {s['app_latency_mean_s']:.1f} | "
                    f"{r.get('step_wall_s', math.nan):.1f} | {r.get('step_pred_s', math.nan):.1f} |"
                )
        out.append("")
    if preset == "a800-qwen2.5-14b" and "sim" in executors and args.apps in (None, 24):
        out += ["## vllm on the a800 preset vs the authors' native vLLM (digest §7.2)", "",
                "| rate | authors base (s) | sim vllm (s) | error | authors combined (s) |"
                " sim tokencake (s) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for rate, ref in AUTHORS_BASE_E2E.items():
            v = by.get((rate, "vllm", "sim"))
            t = by.get((rate, "tokencake", "sim"))
            if v:
                tc = f"{t['total_e2e_s']:.1f}" if t else "—"
                out.append(
                    f"| {rate} | {ref:.1f} | {v['total_e2e_s']:.1f} | "
                    f"{(v['total_e2e_s'] - ref) / ref:+.1%} | {AUTHORS_COMBINED_E2E[rate]:.1f} | "
                    f"{tc} |"
                )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
