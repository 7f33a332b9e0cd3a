"""The Space Scheduler's two scores (paper digest §4.2), kept apart:

* the per-*request* hybrid score (graph + runtime, §4.2.1), exactly as the repository's
  ``request_score``: it orders the waiting queue, picks victims and decides early borrowing;
* the per-*agent-type* history and score (§4.2.3): what each type has cost and waited so
  far, bounded by count, bytes and age (:class:`AgentHistory`); the type score chooses the
  critical types and sizes their reservations (``scheduler/partition.py``).

Everything here is pure arithmetic on validated metadata; :class:`AgentHistory` also keeps
non-finite values out of the type statistics and the type score (defence in depth).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tokencake.scheduler.bounded import ByteLRU
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.request import Request

log = logging.getLogger(__name__)


# ---- the per-request score (§4.2.1) ----------------------------------------------------------
def static_parts(m: AgentMetadata) -> tuple[float, float, float]:
    """(time-independent score part, remaining-depth ratio, progress) of one request."""
    d = m.depth
    max_depth = max(d, m.application_max_depth, 1)
    rem_ratio = min(1.0, m.remaining_depth / max_depth)
    progress = min(1.0, d / max_depth)
    s = m.similarity
    par_width = 1.0 / s if 0 < s < 1 else 1.0
    static = (
        100 * m.importance
        + 15 * d + 45 * m.out_degree + 10 * m.in_degree
        + 20 * s + 20 * m.remaining_depth
        + 120 * (par_width - 1)
        + 6 * min(m.application_start_offset_s, 60)
        + 180 * m.critical_path + 90 * m.near_completion
        + 20 * bool(m.join_group)
        + 4 * (m.dependency_depth or d)
        + 12 * max(m.fanout_width - 1, 0)
        - 8 * max(m.memory_weight - 1, 0)
    )  # fmt: skip
    return static, rem_ratio, progress


def time_parts(
    m: AgentMetadata, arrival: float, now: float, rem_ratio: float, progress: float
) -> float:
    """The score's time-dependent part: application age, queueing time and progress."""
    wait = max(0.0, now - arrival)
    elapsed = m.application_elapsed_s
    if m.application_started_at_s > 0:
        elapsed = max(elapsed, now - m.application_started_at_s)
    else:
        # No start time (0 is "not given"): the application's age is its elapsed time at
        # submission plus the time this request has waited since. Frozen at its submission
        # value, such an application's age never grew and its late stages starved
        # (bench/RESULTS.md, "Fifth round"; the simulator's first application carried no
        # start time until its clock stopped starting at 0).
        elapsed += wait
    age = min(elapsed, 300) * (1 + 0.75 * rem_ratio)
    queue = min(wait, 180) * (1 + 0.5 * rem_ratio)
    completion = min(elapsed, 240) * progress
    return 5 * age + 8 * queue + 5 * completion


def request_score(m: AgentMetadata, arrival_time: float, now: float) -> int:
    """The hybrid per-request score, exactly as the repository's ``request_score``."""
    static, rr, pg = static_parts(m)
    return int(static + time_parts(m, arrival_time, now, rr, pg))


# ---- the per-agent-type history and score (§4.2.3) -------------------------------------------
@dataclass
class TypeStats:
    """Running sums over one agent type's requests (means are taken per sample)."""

    samples: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    depth: float = 0.0
    out_degree: float = 0.0
    in_degree: float = 0.0
    elapsed: float = 0.0
    remaining: float = 0.0
    completed: int = 0
    duration: float = 0.0
    deferrals: int = 0
    preemptions: int = 0
    importance: float = 0.0


class AgentHistory:
    """Per-agent-type statistics: an LRU bounded by bytes (``max_bytes``, and at most
    ``limit`` types) whose entries expire after ``ttl_s`` without use.

    Defence in depth: a type's statistics never hold a non-finite value. An update that would
    make one non-finite is refused (ValueError, blamed on the request being admitted or
    finished), and a score that still comes out non-finite resets that type's history instead
    of failing the step for every request.
    """

    def __init__(
        self, limit: int = 4096, max_bytes: int = 4 * 2**20, ttl_s: float = math.inf
    ) -> None:
        self.limit = limit
        self.stats: ByteLRU[str, TypeStats] = ByteLRU(max_bytes, ttl_s, max_entries=limit)
        self.resets = 0
        self._now = -math.inf

    def expire(self, now: float) -> None:
        self._now = max(self._now, now)
        self.stats.expire(self._now)

    def get(self, key: str) -> TypeStats:
        st = self.stats.get(key, self._now)
        if st is None:
            st = TypeStats()
            self.stats.put(key, st, self._now)
        return st

    def on_admit(self, key: str, req: Request, m: AgentMetadata, now: float) -> None:
        self._now = max(self._now, now)
        st = self.get(key)
        new = {
            "depth": st.depth + m.depth,
            "out_degree": st.out_degree + m.out_degree,
            "in_degree": st.in_degree + m.in_degree,
            "elapsed": st.elapsed + m.application_elapsed_s,
            "remaining": st.remaining + m.remaining_depth,
            "importance": max(st.importance, m.importance),
        }
        _require_finite(key, new)
        st.samples += 1
        st.input_tokens += req.num_prompt_tokens
        for k, v in new.items():
            setattr(st, k, float(v))
        st.deferrals = max(0, st.deferrals - 1)

    def on_finish(self, key: str, req: Request, now: float) -> None:
        self._now = max(self._now, now)
        st = self.get(key)
        duration = st.duration + max(0.0, now - req.arrival_time)
        _require_finite(key, {"duration": duration})
        st.output_tokens += len(req.output_token_ids)
        st.completed += 1
        st.duration = duration

    def on_defer(self, key: str) -> None:
        self.get(key).deferrals += 1

    def on_preempt(self, key: str) -> None:
        self.get(key).preemptions += 1

    def score(self, key: str, importance: float, avg_wait: float, n_waiting: int) -> float:
        st = self.get(key)
        try:
            s = type_score(st, importance, avg_wait, n_waiting)
        except (ArithmeticError, ValueError, TypeError):
            s = math.nan
        if math.isfinite(s) and all(math.isfinite(v) for v in vars(st).values()):
            return s
        # Unreachable with validated inputs; if it happens, forget the type, not the step.
        log.warning("agent type %.64r: non-finite history score, history reset", key)
        self.resets += 1
        self.stats.put(key, TypeStats(), self._now)
        return max(1.0, 2 * importance) if math.isfinite(importance) else 1.0


def _require_finite(key: str, values: dict[str, float]) -> None:
    for name, v in values.items():
        if not math.isfinite(v):
            raise ValueError(
                f"agent type {key[:64]!r}: history field {name!r} would become {v!r}; "
                "the update is refused"
            )


def type_score(st: TypeStats, importance: float, avg_wait: float, n_waiting: int) -> float:
    """One agent type's score: importance, urgency (waiting, deferrals, preemptions), cost and
    its place in the graph, at least 1 (NaN is passed through for the caller to catch)."""
    urgency = (math.log1p(avg_wait) + math.log1p(n_waiting) + math.log1p(st.deferrals)
               + 1.5 * math.log1p(st.preemptions))  # fmt: skip
    n = max(1, st.samples)
    tokens = (st.input_tokens + st.output_tokens) / n
    dur = st.duration / max(1, st.completed)
    cost = math.log1p(tokens)
    if dur > 0 and tokens > 0:
        cost += math.log1p(dur) + math.log1p(tokens / dur)
    graph = (0.7 * st.depth / n + 0.5 * st.out_degree / n + 0.25 * st.in_degree / n
             + 0.20 * st.remaining / n + 0.10 * min(st.elapsed / n, 180))  # fmt: skip
    raw = 2 * importance + urgency + 0.5 * cost + graph
    return raw if math.isnan(raw) else max(1.0, raw)  # max() would hide a NaN
