"""Metrics of a policy run, and the JSON / markdown / PNG reports of a comparison.

:class:`Collector` watches a backend's scheduler while the driver runs (after every step and
before every idle wait) and integrates KV occupancy over time by state:

* ``running`` — device blocks owned by running (admitted) requests; its time average over the
  capacity is the effective KV utilization **held** (``kv_util_held``; KV idle behind a tool
  call, cached or free does not count). While a step executes, the count is the one at the moment the step was
  planned (the backends record it as ``plan_running_blocks``), so a request counts from the
  step that admits it through the step that finishes it; between steps, the state after the
  last step is held;
* effective KV utilization **read** (``kv_util_read``): the time average of the blocks the
  executing step reads (each computing request's blocks up to its chunk's end) over the
  capacity; zero between steps. Held-but-unread KV (admitted growth headroom, requests
  waiting for a copy-in, rows the token budget left out) counts only in the first;
* ``stalled_pinned`` — blocks a policy pins for agents waiting on a tool (Time Scheduler keep
  / Continuum TTL);
* ``stalled_resident`` — device blocks holding a stalled agent's prefix, pinned or merely
  cached (vLLM keeps it only while nothing evicts it): the "KV held by stalled agents";
* ``cached`` — evictable prefix-cache blocks; ``free`` — never-used or released blocks;
  ``other`` — the rest (copies in flight, blocks of waiting requests mid-restore).

``idle_tool_kv_block_s`` is the ``stalled_resident`` integral (block-seconds of device KV
behind tool calls), ``idle_tool_kv_share`` its time average over the capacity.
``recomputed_tokens`` counts tokens executed a second time (the scheduler's per-request
high-water mark); ``recomputed_tokens_check`` is the independent count: executed tokens
minus every call's first pass.

:func:`summarize` turns a :class:`~bench.driver.RunResult` plus its collector into one flat
dict of metrics; :func:`write_reports` writes ``results.json``, ``report.md`` and the plots.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.driver import RunResult

STATES = ("running", "stalled_pinned", "stalled_resident", "cached", "free", "other")


@dataclass
class Collector:
    """Integrates occupancy between observations (sample-and-hold) and counts copies.

    ``sample_s`` spaces the timeline samples (and the costlier stalled-resident count).
    """

    backend: Any
    sample_s: float = 0.5
    t0: float = 0.0
    last_t: float | None = None
    integral: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATES, 0.0))
    timeline: list[dict[str, float]] = field(default_factory=list)
    copy_bytes: dict[str, int] = field(default_factory=lambda: {"d2h": 0, "h2d": 0})
    executed: dict[str, int] = field(
        default_factory=lambda: {"prefill": 0, "decode": 0, "total": 0}
    )
    read_integral: float = 0.0  # blocks read by computing requests x seconds
    steps: int = 0
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    _state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    _next_sample: float = 0.0
    _seen_plan: Any = None

    def start(self, now: float) -> None:
        self.t0 = self.last_t = now
        self._next_sample = now
        self._state = self._measure(full=True)

    def _measure(self, full: bool) -> dict[str, int]:
        s = self.backend.scheduler
        pool = s.pool
        cap = pool.capacity
        running: set[int] = set()
        for r in s.running:
            running.update(r.block_ids)
        ts = s.policy.time_scheduler_stats()
        pinned = int(ts.stalled_blocks) if ts is not None else 0
        resident = self._state.get("stalled_resident", 0)
        if full:
            resident = 0
            by_hash = getattr(pool, "_block_of", {})
            for rec in s.lifecycle.live():
                if rec.stalled and rec.snapshot:
                    for h in rec.snapshot:
                        h = h[1] if isinstance(h, tuple) else h
                        if h in by_hash:
                            resident += 1
        cached = pool.num_cached
        free = pool.num_free - cached
        other = max(0, cap - len(running) - pinned - cached - free)
        return {
            "running": len(running),
            "stalled_pinned": pinned,
            "stalled_resident": resident,
            "cached": cached,
            "free": free,
            "other": other,
        }

    def observe(self, now: float) -> None:
        """Account for the time since the last call, then take the new state."""
        if self.last_t is None:
            self.start(now)
        plan = getattr(self.backend, "last_plan", None)
        new_plan = plan is not None and plan is not self._seen_plan
        snap = getattr(self.backend, "plan_running_blocks", None) if new_plan else None
        if snap is not None:
            # A step ran since the last observation: until it was planned the held state
            # applies; while it executed, the requests it ran (including the ones it admitted
            # and the ones it finished) held their blocks: the running count at plan time.
            t_plan = min(max(snap[0], self.last_t), now)
            for k, v in self._state.items():
                self.integral[k] += v * (t_plan - self.last_t)
                if k != "running":
                    self.integral[k] += v * (now - t_plan)
            self.integral["running"] += snap[1] * (now - t_plan)
            if len(snap) > 2:  # blocks the step reads (only while it executes)
                self.read_integral += snap[2] * (now - t_plan)
        else:
            dt = now - self.last_t
            for k, v in self._state.items():
                self.integral[k] += v * dt
        self.last_t = now
        if new_plan:
            self._seen_plan = plan
            self.steps += 1
            for c in plan.copies:
                self.copy_bytes[c.direction] += len(c.device_blocks) * self._bytes_per_block()
            for ch in plan.chunks:
                self.executed["total"] += ch.num_tokens
                if ch.num_tokens == 1 and ch.start >= ch.request.num_prompt_tokens:  # a decode row
                    self.executed["decode"] += 1
                else:
                    self.executed["prefill"] += ch.num_tokens
        full = now >= self._next_sample
        self._state = self._measure(full)
        for k, v in self._state.items():
            self.peak[k] = max(self.peak[k], v)
        if full:
            s = self.backend.scheduler
            host = getattr(s, "host_pool", None)
            self.timeline.append(
                {
                    "t": now - self.t0,
                    **self._state,
                    "waiting": len(s.waiting),
                    "running_reqs": len(s.running),
                    "host_used": 0 if host is None else host.num_used,
                }  # fmt: skip
            )
            self._next_sample = now + self.sample_s

    def _bytes_per_block(self) -> int:
        cm = getattr(self.backend, "cost_model", None)
        return int(getattr(cm, "bytes_per_block", 0))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


def summarize(res: RunResult, col: Collector) -> dict[str, Any]:
    """One flat dict of every metric of one policy run (times in seconds)."""
    chat = {c.app_id: c.traffic for c in res.calls if c.traffic != "agent"}
    lat = [a.latency_s for a in res.apps if a.app_id not in chat] or [math.nan]
    first = min(a.arrival_s for a in res.apps)
    last = max(a.finished_s for a in res.apps)
    crit: dict[str, float] = {}
    crit_tool: dict[str, float] = {}
    for c in res.calls:
        if c.critical:
            crit[c.app_id] = crit.get(c.app_id, 0.0) + (c.finished_s - c.submitted_s)
            crit_tool[c.app_id] = crit_tool.get(c.app_id, 0.0) + c.tool_s
    ttft_tool = [c.ttft_s for c in res.calls if c.after_tool and c.ttft_s is not None]
    ttft_all = [c.ttft_s for c in res.calls if c.ttft_s is not None]
    prompt = sum(c.prompt_tokens for c in res.calls)
    cached = sum(c.cached_tokens for c in res.calls)
    s = col.backend.scheduler
    bpt = max(1, col._bytes_per_block() // s.pool.block_size)
    host_hit = col.copy_bytes["h2d"] // bpt
    total_t = max(1e-9, (col.last_t or 0.0) - col.t0)
    cap = s.pool.capacity
    avg = {k: v / total_t for k, v in col.integral.items()}
    ts = s.policy.time_scheduler_stats()
    # Independent count of re-executed tokens: every executed token minus each call's first
    # pass (its prompt past the cache hit at first admission, and its output but the last
    # sampled token, which is never computed).
    first_pass = sum(
        c.prompt_tokens - c.cached_tokens + max(0, c.output_tokens - 1) for c in res.calls
    )
    out: dict[str, Any] = {
        "policy": res.policy,
        "apps": len(res.apps),
        "calls": len(res.calls),
        "total_e2e_s": last - first,
        "app_latency_mean_s": float(np.mean(lat)),
        "app_latency_p50_s": _pct(lat, 50),
        "app_latency_p95_s": _pct(lat, 95),
        "critical_path_llm_s_mean": float(np.mean(list(crit.values()))) if crit else math.nan,
        "critical_path_tool_s_mean": float(np.mean(list(crit_tool.values())))
        if crit_tool
        else math.nan,
        "ttft_after_tool_mean_s": float(np.mean(ttft_tool)) if ttft_tool else math.nan,
        "ttft_after_tool_p95_s": _pct(ttft_tool, 95),
        "ttft_mean_s": float(np.mean(ttft_all)) if ttft_all else math.nan,
        "input_tokens": prompt,
        "first_pass_prefill_tokens": prompt - cached,
        "executed_prefill_tokens": col.executed["prefill"],
        "decode_tokens": col.executed["decode"],
        "device_hit_tokens": max(0, cached - host_hit),
        "host_hit_tokens": host_hit,
        "input_reuse": cached / prompt if prompt else 0.0,
        "preemptions": int(s.num_preemptions),
        "recomputed_tokens": sum(c.recomputed_tokens for c in res.calls),
        "recomputed_tokens_check": col.executed["total"] - first_pass,
        "executed_tokens": col.executed["total"],
        "copy_out_bytes": col.copy_bytes["d2h"],
        "copy_in_bytes": col.copy_bytes["h2d"],
        "effective_kv_utilization": avg["running"] / cap,
        "kv_util_held": avg["running"] / cap,
        "kv_util_read": col.read_integral / total_t / cap,
        "idle_tool_kv_block_s": col.integral["stalled_resident"],
        "idle_tool_kv_share": avg["stalled_resident"] / cap,
        "stalled_kv_pinned_blocks_mean": avg["stalled_pinned"],
        "stalled_kv_resident_blocks_mean": avg["stalled_resident"],
        "stalled_kv_resident_blocks_peak": col.peak["stalled_resident"],
        "kv_blocks_mean": avg,
        "kv_capacity_blocks": cap,
        "steps": col.steps,
        "events": res.events,
        "wall_s": res.wall_s,
    }
    for kind in sorted(set(chat.values())):  # starvation check (bench.mixed)
        xs = [c.finished_s - c.submitted_s for c in res.calls if c.traffic == kind]
        out[f"{kind}_calls"] = len(xs)
        out[f"{kind}_latency_mean_s"] = float(np.mean(xs))
        out[f"{kind}_latency_p95_s"] = _pct(xs, 95)
    if ts is not None:
        out["time_scheduler_counters"] = dict(ts.counters)
    return out


# ---- reports ---------------------------------------------------------------------------------
TABLE_COLS = [
    ("total_e2e_s", "total E2E (s)", "{:.1f}"),
    ("app_latency_mean_s", "app mean (s)", "{:.1f}"),
    ("app_latency_p50_s", "app P50 (s)", "{:.1f}"),
    ("app_latency_p95_s", "app P95 (s)", "{:.1f}"),
    ("critical_path_llm_s_mean", "crit-path LLM (s)", "{:.1f}"),
    ("ttft_after_tool_mean_s", "TTFT after tool (s)", "{:.2f}"),
    ("first_pass_prefill_tokens", "first-pass prefill", "{:,}"),
    ("device_hit_tokens", "device hits", "{:,}"),
    ("host_hit_tokens", "host hits", "{:,}"),
    ("preemptions", "preempt.", "{}"),
    ("recomputed_tokens", "recomputed", "{:,}"),
    ("copy_out_bytes", "copy-out B", "{:.3g}"),
    ("copy_in_bytes", "copy-in B", "{:.3g}"),
    ("stalled_kv_resident_blocks_mean", "stalled KV (blk)", "{:.0f}"),
    ("kv_util_held", "KV held", "{:.1%}"),
    ("kv_util_read", "KV read", "{:.1%}"),
    ("idle_tool_kv_share", "KV idle on tools", "{:.1%}"),
]


def markdown_table(rows: list[dict[str, Any]], key: str = "rate") -> str:
    """One row per (rate, policy), with the E2E change vs vllm at the same rate."""
    head = [key, "policy", *(h for _, h, _ in TABLE_COLS), "E2E vs vllm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r.get(key): r["total_e2e_s"] for r in rows if r["policy"] == "vllm"}
    for r in rows:
        cells = [str(r.get(key, "")), r["policy"]]
        for k, _, fmt in TABLE_COLS:
            v = r.get(k)
            cells.append(
                "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
            )
        b = base.get(r.get(key))
        cells.append(f"{(r['total_e2e_s'] - b) / b:+.1%}" if b else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(
    out_dir: Path,
    rows: list[dict[str, Any]],
    timelines: dict[str, list[dict[str, float]]],
    meta: dict[str, Any],
    extra_md: str = "",
) -> None:
    """``results.json`` (every metric + timelines), ``report.md`` and PNG plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps({"meta": meta, "results": rows, "timelines": timelines}, indent=1, default=str)
    )
    md = [f"# {meta.get('title', 'Policy comparison')}", "", "```", json.dumps(meta, indent=1,
          default=str), "```", "", markdown_table(rows), ""]  # fmt: skip
    if extra_md:
        md += [extra_md, ""]
    plots = plot_all(out_dir, rows, timelines)
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")


def plot_all(
    out_dir: Path, rows: list[dict[str, Any]], timelines: dict[str, list[dict[str, float]]]
) -> list[Path]:
    """Latency vs arrival rate per policy (when several rates), KV occupancy by state per run.
    Returns the written files (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install -e '.[bench]'
        return []
    written = []
    rates = sorted({r["rate"] for r in rows if r.get("rate") is not None})
    if len(rates) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for pol in dict.fromkeys(r["policy"] for r in rows):
            rs = sorted((r for r in rows if r["policy"] == pol), key=lambda r: r["rate"])
            x = [r["rate"] for r in rs]
            axes[0].plot(x, [r["total_e2e_s"] for r in rs], "o-", label=pol)
            axes[1].plot(x, [r["app_latency_mean_s"] for r in rs], "o-", label=pol)
        for ax, t in zip(axes, ("total E2E (s)", "mean application latency (s)"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("arrival rate (apps/s)")
            ax.set_ylabel(t)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        p = out_dir / "latency_vs_rate.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    if timelines:
        n = len(timelines)
        fig, axes = plt.subplots(n, 1, figsize=(10, 2.4 * n), squeeze=False)
        states = ("running", "stalled_pinned", "cached", "other", "free")
        for ax, (name, tl) in zip(axes[:, 0], timelines.items(), strict=True):
            if not tl:
                continue
            t = [s["t"] for s in tl]
            ax.stackplot(t, *[[s[k] for s in tl] for k in states], labels=states, alpha=0.85)
            ax.plot(t, [s["stalled_resident"] for s in tl], "k--", lw=1, label="stalled (resident)")
            ax.set_title(name, fontsize=9)
            ax.set_ylabel("KV blocks")
        axes[0, 0].legend(fontsize=7, ncol=6, loc="upper right")
        axes[-1, 0].set_xlabel("time since first arrival (s)")
        fig.tight_layout()
        p = out_dir / "kv_occupancy.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written
