"""One validated configuration object for Tokencake's Space and Time Schedulers.

Defaults are the published ones (paper digest §8.3 and the hard-coded constants table); the
few knobs that exist only because this engine implements the paper's *predictive upload* and
the keep-with-TTL alternative are marked as ours. ``TokencakeConfig.from_dict`` is strict:
an unknown key is an error naming the key (with its section), so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ADMISSION_ORDERS = ("score", "application-fcfs", "arrival")


def _check(cond: bool, name: str, why: str) -> None:
    if not cond:
        raise ValueError(f"tokencake config: {name} {why}")


def _unit(name: str, v: float) -> None:
    _check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, name, f"must be in [0, 1], got {v!r}")


def _nonneg(name: str, v: float) -> None:
    _check(
        isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
        name,
        f"must be >= 0, got {v!r}",
    )


def _pos(name: str, v: float) -> None:
    _check(
        isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, f"must be > 0, got {v!r}"
    )


def _int(name: str, v: int, lo: int) -> None:
    _check(
        isinstance(v, int) and not isinstance(v, bool) and v >= lo,
        name,
        f"must be an integer >= {lo}, got {v!r}",
    )


@dataclass(frozen=True)
class SpaceConfig:
    """Space Scheduler knobs (§4). ``adjustment_window`` .. ``near_finish_fraction`` are the
    repository's hard-coded constants, exposed so tests can shrink them."""

    enabled: bool = True
    # The paper's full-future admission (prompt + max_tokens) is off by default since issue 12:
    # with every block written back to the host tier a preemption costs a copy, not a
    # recompute, and reserving growth left ~10% of the pool idle (authors' workload, 12 apps
    # at 1.0 apps/s: 297.7 s with it off vs 312.2 s on; the ablation table in
    # bench/RESULTS.md). Off, admission counts the current sequence (vLLM's full-sequence check).
    reserve_generation_tokens: bool = False
    cache_affinity_score_band: int = 500
    inherit_join_priority: bool = True
    priority_borrow_score_margin: int = 500
    critical_ratio: float = 0.75
    reserve_ratio_min: float = 0.05
    reserve_ratio_max: float = 0.30
    gpu_usage_low: float = 0.40
    gpu_usage_high: float = 0.75
    reserve_adjustment_step: float = 0.05
    adjustment_window: int = 500
    preemption_score_band: int = 3000
    near_finish_fraction: float = 0.9
    history_limit: int = 4096
    # ours: the per-agent-type history is also bounded by bytes (keys are client strings) and
    # a type unseen for history_ttl_s is forgotten.
    history_max_bytes: int = 4 * 2**20
    history_ttl_s: float = 3600.0
    # ours: scores are frozen for this long (the time terms move ~8 points/s, far below the
    # 500-point bands), so a step only scores newcomers; 0 rescores every step as the paper does.
    score_refresh_s: float = 0.1
    # ours: "score" admits annotated requests by the §4.2 score (the paper); "application-fcfs"
    # admits them in order of their application's start (program-level FCFS, as Autellix and
    # Continuum do), which finishes wide fan-outs sooner (see bench/RESULTS.md §2); "arrival"
    # is the native order (the scoring ablation).
    admission_order: str = "score"
    # ours (issue 12): defer a waiting request whose next uncached block a running request is
    # computing right now (a fan-out sibling): it then hits that block instead of computing
    # and holding a second copy (scheduler/sharing.py)
    defer_inflight_prefix: bool = True
    # ours (issue 12): when the best-ranked waiting request does not fit, admit requests behind
    # it that fit now and cannot delay it (EASY backfilling; scheduler/backfill.py)
    backfill: bool = True
    # ours (issue 12): backfill's left-over blocks count only blocks that will really be freed
    # (not those of a finishing agent a KEEP may pin for its tool call). EASY's promise then
    # holds (tests/test_backfill.py), but it lost overall: authors 24 @ 1.0 apps/s 536.5 s vs
    # 516.8 s, 12 @ 1.0 286.5 vs 271.9; won at 0.2 (540.0 vs 548.5) and code-writer (327.9
    # vs 332.4); bench/RESULTS.md. Off: the optimistic estimate.
    backfill_sure_extra: bool = False
    # ours (issue 12, fifth round): the active-prefix affinity (§4.7) also counts a prefix
    # that is resident but held by no running request (a finished predecessor's cached
    # blocks, which the next admission may evict). Off: measured in bench/RESULTS.md
    # ("Fifth round"); the ``tokencake-with-resident-affinity`` ablation switches it on.
    affinity_counts_cached: bool = False
    # ours (issue 12, sixth round): for this many seconds after a request finishes, a waiting
    # request that extends its still-cached context (its successor in the application, not a
    # DAG leaf) goes first in the admission order (scheduler/handoff.py). Off (0): on
    # deep-research it cost 2.2% at 1.0 apps/s while saving 2.4% at 0.2 (bench/RESULTS.md,
    # "Sixth round"); ``tokencake-with-successor-handoff`` sets 0.5 s.
    successor_handoff_s: float = 0.0
    # ours (issue 12, sixth round): among running requests that each free enough blocks for
    # the needy one, preempt the one whose KV is cheapest to restore in *seconds* (copy-in of
    # the host-restorable prefix plus recompute of the rest, by the cost model), not the one
    # with the least recompute per freed block. With every block written back, a long-context
    # request recomputes nothing, so the per-block rule preempted the longest session to give
    # a decoding neighbour one block (multi-turn, bench/RESULTS.md "Sixth round"). Off: it
    # lost on deep-research; ``tokencake-with-restore-time-victims`` switches it on.
    victim_by_restore_time: bool = False
    # ours (issue 12, eighth round): the second admission pass (which retries requests the
    # reservations refused) keeps the first pass's backfill state: a request retried there
    # starts only if it cannot delay the blocked head (finishes by its shadow step, or fits in
    # the blocks left over), as in the first pass. Off, the state is reset between passes and
    # a refused request retried in the second pass could take the blocks the head was promised
    # (tests/test_backfill.py). Off by default: deep-research 12 -2.8% at 0.2 apps/s but +2.9%
    # at 1.0, code-writer 12 +5.7% / +1.5% (bench/RESULTS.md, "Eighth round");
    # ``tokencake-with-second-pass-backfill`` switches it on.
    backfill_second_pass: bool = False
    # ours (issue 12, fifteenth round): while decode rows run, a step carries only the prefill
    # tokens that fit under its cost floor (the weight and KV reads its compute hides in:
    # ``CostModel.free_prefill_tokens``, Sarathi-Serve's stall-free batching on the roofline).
    # A long prompt then no longer stalls every decoding agent for a compute-bound step, and
    # the decode steps' idle compute does its prefill. No effect where the floor is unmeasured
    # or leaves less than one block of room (compute-bound hardware such as the CPU engine).
    # ``tokencake-no-stall-free-prefill`` switches it off.
    stall_free_prefill: bool = True

    def __post_init__(self) -> None:
        _nonneg("scheduling.score_refresh_s", self.score_refresh_s)
        _nonneg("scheduling.successor_handoff_s", self.successor_handoff_s)
        _check(
            self.admission_order in ADMISSION_ORDERS,
            "scheduling.admission_order",
            f"must be one of {', '.join(ADMISSION_ORDERS)}, got {self.admission_order!r}",
        )
        _int("scheduling.cache_affinity_score_band", self.cache_affinity_score_band, 0)
        _int("scheduling.priority_borrow_score_margin", self.priority_borrow_score_margin, 0)
        _check(
            0 < self.critical_ratio <= 1,
            "scheduling.critical_ratio",
            f"must be in (0, 1], got {self.critical_ratio!r}",
        )
        for n in (
            "reserve_ratio_min",
            "reserve_ratio_max",
            "gpu_usage_low",
            "gpu_usage_high",
            "near_finish_fraction",
        ):
            _unit(f"scheduling.{n}", getattr(self, n))
        _check(
            self.reserve_ratio_min <= self.reserve_ratio_max,
            "scheduling.reserve_ratio_min",
            "must be <= reserve_ratio_max",
        )
        _check(
            self.gpu_usage_low < self.gpu_usage_high,
            "scheduling.gpu_usage_low",
            "must be < gpu_usage_high",
        )
        _check(
            0 < self.reserve_adjustment_step <= 1,
            "scheduling.reserve_adjustment_step",
            "must be in (0, 1]",
        )
        _int("scheduling.adjustment_window", self.adjustment_window, 1)
        _int("scheduling.preemption_score_band", self.preemption_score_band, 0)
        _int("scheduling.history_limit", self.history_limit, 1)
        _int("scheduling.history_max_bytes", self.history_max_bytes, 4096)
        _pos("scheduling.history_ttl_s", self.history_ttl_s)


@dataclass(frozen=True)
class TimeConfig:
    """Time Scheduler knobs (§5). The ``keep_*``, ``upload_*``, ``reservation_ramp_s`` and
    ``handoff_grace_s`` knobs are ours (predictive upload and TTL keep are not in the
    repository); the rest are the published defaults."""

    enabled: bool = True
    min_gpu_usage: float = 0.60
    high_pressure_gpu_usage: float = 0.85
    score_threshold: float = 1.0
    backoff_steps: int = 8
    eviction_window_blocks: int = 128
    max_relief_blocks: int = 0
    default_stall_s: float = 1.0
    release_lead_s: float = 0.10
    ewma_alpha: float = 0.5
    attach_seconds: float = 60.0
    tombstone_seconds: float = 60.0
    safety_factor: float = 4.0
    safety_min_s: float = 60.0
    safety_max_s: float = 3600.0
    churn_window_steps: int = 4
    churn_budget_stores: int = 64
    # ours: keep-on-device with a TTL (Continuum-style safety valve); ``keep`` False never pins
    keep: bool = True
    # the benefit-selected OFFLOAD action (§5.6) with its predictive upload. Off by default
    # since issue 12: with ``write_back_all`` the host already holds a finished agent's blocks
    # (on the authors' workload 0 of 30,856 offloaded blocks needed a copy), so OFFLOAD only
    # schedules a restore whose reserved and pinned device blocks cost more than the copy-in
    # they save. Off vs on, total E2E at 12 apps @ 1.0 apps/s: authors -0.9%, deep-research
    # +0.4%, code-writer -1.2% (bench/RESULTS.md, "Ablation, fourth round"). The
    # ``tokencake-with-offload`` ablation switches it on.
    selective_offload: bool = False
    keep_ttl_factor: float = 1.5
    keep_ttl_min_s: float = 0.5
    keep_ttl_max_s: float = 60.0
    # ours: predictive upload with progressive reservation
    predictive_upload: bool = True
    reservation_ramp_s: float = 1.0
    overrun_grace_s: float = 1.0
    handoff_grace_s: float = 5.0
    # ours: cached-block eviction ranked by expected reuse (a tool-waiting agent's dropped
    # blocks by predicted return, a queued request's prefix as wanted since its arrival, a
    # finished leaf agent's own blocks first). Off by default since the twentieth round: on
    # the authors' workload it made total E2E longer in 12 of 13 cells (every rate, and tool
    # noise seeds), x1.014 in all; on 60 generator cells (seeds, reshaped) it was within
    # noise (with it on: x1.000 total E2E, x0.996 application mean). The blocks no ranking
    # covers (mostly a preempted request's own) are the hottest in the pool, yet they go
    # first (bench/RESULTS.md, "Twentieth round"); ``tokencake-with-reuse-eviction``
    reuse_aware_eviction: bool = False
    # ours (issue 12): write every computed full block back to the host tier when its request
    # finishes, and swap (not recompute) preempted requests, so a later miss is a copy-in
    # (~16 us/token on the a800 preset) rather than a recompute (~120 us/token)
    write_back_all: bool = True
    # ours (issue 12): a running request short of a block takes kept agents' pinned blocks
    # (the call predicted to return last first) before anything is preempted: pins are a
    # bet on a successor, a preemption stalls a request that is computing. Seeds 1-5, 10
    # apps, 3 generators x 2 rates: total E2E x0.994, application mean x0.980, preemptions
    # 292 -> 179 (bench/RESULTS.md, "Seventeenth round"); ``tokencake-no-growth-release``
    growth_release: bool = True

    def __post_init__(self) -> None:
        _unit("offload.min_gpu_usage", self.min_gpu_usage)
        _unit("offload.high_pressure_gpu_usage", self.high_pressure_gpu_usage)
        _check(
            self.min_gpu_usage < self.high_pressure_gpu_usage,
            "offload.min_gpu_usage",
            "must be < high_pressure_gpu_usage",
        )
        _nonneg("offload.score_threshold", self.score_threshold)
        _int("offload.backoff_steps", self.backoff_steps, 0)
        _int("offload.eviction_window_blocks", self.eviction_window_blocks, 1)
        _int("offload.max_relief_blocks", self.max_relief_blocks, 0)
        _pos("offload.default_stall_s", self.default_stall_s)
        _nonneg("offload.release_lead_s", self.release_lead_s)
        _check(
            0 < self.ewma_alpha <= 1,
            "offload.ewma_alpha",
            f"must be in (0, 1], got {self.ewma_alpha!r}",
        )
        for n in ("attach_seconds", "tombstone_seconds", "safety_min_s", "keep_ttl_min_s", "reservation_ramp_s",
                  "overrun_grace_s", "handoff_grace_s"):  # fmt: skip
            _nonneg(f"offload.{n}", getattr(self, n))
        _pos("offload.safety_factor", self.safety_factor)
        _check(
            self.safety_min_s <= self.safety_max_s,
            "offload.safety_min_s",
            "must be <= safety_max_s",
        )
        _pos("offload.keep_ttl_factor", self.keep_ttl_factor)
        _check(
            self.keep_ttl_min_s <= self.keep_ttl_max_s,
            "offload.keep_ttl_min_s",
            "must be <= keep_ttl_max_s",
        )
        _int("offload.churn_window_steps", self.churn_window_steps, 1)
        _int("offload.churn_budget_stores", self.churn_budget_stores, 0)


@dataclass(frozen=True)
class TokencakeConfig:
    """Both schedulers' settings. ``scheduling`` / ``offload`` mirror the paper's sections."""

    scheduling: SpaceConfig = field(default_factory=SpaceConfig)
    offload: TimeConfig = field(default_factory=TimeConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TokencakeConfig:
        """Strict parse of ``{"scheduling": {...}, "offload": {...}}``.

        Unknown keys, and tuning keys under a section with ``enabled: false``, are errors
        naming the key (the paper's server refuses to start on either).
        """
        data = dict(data or {})
        sections = {"scheduling": SpaceConfig, "offload": TimeConfig}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ValueError(
                f"tokencake config: unknown key {unknown[0]!r} (expected one of: scheduling, offload)"
            )
        built: dict[str, Any] = {}
        for name, klass in sections.items():
            sec = data.get(name) or {}
            if not isinstance(sec, dict):
                raise ValueError(
                    f"tokencake config: {name} must be an object, got {type(sec).__name__}"
                )
            names = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(sec) - names)
            if bad:
                raise ValueError(f"tokencake config: unknown key {name}.{bad[0]!r}")
            if sec.get("enabled", True) is False and set(sec) - {"enabled"}:
                extra = sorted(set(sec) - {"enabled"})[0]
                raise ValueError(
                    f"tokencake config: {name}.{extra} given while {name}.enabled is false"
                )
            built[name] = klass(**sec)
        return cls(**built)
