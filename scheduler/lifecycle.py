"""Tool-call lifecycle state machine (paper digest §5.3, §8.2).

One record per LLM call that may be followed by a tool call (keyed by the request id); a
client-visible *handle* (the ``lifecycle_id`` of the wire protocol) names the conversation's
current record and is reusable once that record's request has finished (a new call of the same
agent supersedes the old record: an open stall ends, the agent is back).

Lifecycles have two sources, one model (DESIGN.md rule 10): explicit events (below) and the
tool-calling protocol (``inferred.py``). Both drive the same records; explicit events win: an
explicit ``stall_started`` replaces an inferred stall's kind and estimate, and whichever
``stall_finished`` comes first ends the stall.

States:

``generating`` -> ``awaiting_start`` (generation finished) -> ``active`` (stall started)
-> ``released`` (the predicted return is near: host ownership handed to the upload) -> terminal
(``finished | aborted | error | expired | reset``).

Every event gets a named :class:`Disposition` that the server maps to an HTTP status. Expiry is
lazy (no timer thread): every call first runs :meth:`Lifecycle.expire` with the injected clock.
Subscribers (the Time Scheduler) hear every transition through ``listeners``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.limits import (
    MAX_ESTIMATED_DURATION_S,
    MAX_NAME_CHARS,
    check_id,
    check_number,
    check_string,
)
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.predictor import DurationPredictor
from tokencake.scheduler.tokencake_config import TimeConfig


class Disposition(enum.Enum):
    """Outcome of one lifecycle event, with the HTTP status the server answers."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE_FINISH = "late_finish"
    UNKNOWN = "unknown"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INVALID = "invalid"

    @property
    def http_status(self) -> int:
        return _HTTP[self]


_HTTP = {
    Disposition.APPLIED: 200,
    Disposition.DUPLICATE: 200,
    Disposition.LATE_FINISH: 200,
    Disposition.UNKNOWN: 404,
    Disposition.CONFLICT: 409,
    Disposition.UNAVAILABLE: 503,
    Disposition.INVALID: 400,
}


class LifecycleState(enum.Enum):
    GENERATING = "generating"
    AWAITING_START = "awaiting_start"
    ACTIVE = "active"
    RELEASED = "released"
    TERMINAL = "terminal"


def _valid_id(lid: Any) -> bool:
    try:
        check_id("lifecycle_id", lid)
    except RequestRejected:
        return False
    return True


_START_KEYS = {"event", "lifecycle_id", "kind", "estimated_duration_s"}
_FINISH_KEYS = {"event", "lifecycle_id"}


@dataclass(frozen=True)
class LifecycleEvent:
    """One client event (paper §8.2): ``stall_started`` (with the tool's ``kind`` and an
    optional estimate) or ``stall_finished``."""

    event: str
    lifecycle_id: str
    kind: str = "stall"
    estimated_duration_s: float | None = None

    @classmethod
    def parse(cls, body: Any) -> LifecycleEvent:
        """Validate a JSON body; a bad field raises :class:`RequestRejected` naming it."""
        if not isinstance(body, dict):
            raise RequestRejected(None, "event body must be a JSON object")
        name = body.get("event")
        if name not in ("stall_started", "stall_finished"):
            raise RequestRejected(
                "event", "field 'event' must be 'stall_started' or 'stall_finished'"
            )
        extra = sorted(set(body) - (_START_KEYS if name == "stall_started" else _FINISH_KEYS))
        if extra:
            raise RequestRejected(extra[0], f"unexpected field {extra[0]!r} for event {name!r}")
        lid = check_id("lifecycle_id", body.get("lifecycle_id"), label="field 'lifecycle_id'")
        kind = check_string("kind", body.get("kind", "stall"), MAX_NAME_CHARS, nonempty=True,
                            label="field 'kind'")  # fmt: skip
        estimate = None
        if "estimated_duration_s" in body:  # ints are bounded before any float conversion
            estimate = check_number(
                "estimated_duration_s", body["estimated_duration_s"], 0.0,
                MAX_ESTIMATED_DURATION_S, lo_open=True,
                label="field 'estimated_duration_s' (omit it if unknown)",
            )  # fmt: skip
        return cls(name, lid, kind, estimate)


@dataclass
class LifecycleRecord:
    """Everything known about one agent's LLM call and the tool call that follows it."""

    lifecycle_id: str
    metadata: AgentMetadata
    created_at: float
    state: LifecycleState = LifecycleState.GENERATING
    cause: str = ""
    completed_at: float | None = None
    started_at: float | None = None
    kind: str | None = None
    estimate: float | None = None
    predicted: float = 0.0
    safety_deadline: float = math.inf
    release_deadline: float = math.inf
    terminal_at: float | None = None
    finish_seen: bool = False
    h2d_estimate: float = 0.0
    snapshot: Any = None  # the finished request's (device block, hash) prefix; see time_sched
    handle: str = ""  # the client-visible lifecycle id ("" -> the key)
    source: str = ""  # who started the stall: "explicit" (an event) or "inferred" (tool_calls)
    call_ids: tuple[str, ...] = ()  # the tool calls the response made (inferred.py)

    @property
    def terminal(self) -> bool:
        return self.state is LifecycleState.TERMINAL

    @property
    def stalled(self) -> bool:
        """Generation done and the tool is running: the window the Time Scheduler works in."""
        return (
            self.state in (LifecycleState.ACTIVE, LifecycleState.RELEASED)
            and self.completed_at is not None
        )

    @property
    def predicted_end(self) -> float:
        return (self.started_at or 0.0) + self.predicted

    def body(self, event: str, disposition: Disposition) -> dict[str, Any]:
        return {"lifecycle_id": self.handle or self.lifecycle_id, "event": event, "state": self.state.value,
                "disposition": disposition.value}  # fmt: skip


Listener = Callable[[LifecycleRecord, str], None]


class Lifecycle:
    """All lifecycle records of one engine, driven by request events and client events."""

    def __init__(
        self,
        clock: Callable[[], float],
        config: TimeConfig | None = None,
        predictor: DurationPredictor | None = None,
    ) -> None:
        self.clock = clock
        self.config = config or TimeConfig()
        self.predictor = predictor or DurationPredictor(
            self.config.ewma_alpha, self.config.default_stall_s, clock=clock
        )
        self.records: dict[str, LifecycleRecord] = {}
        self.handles: dict[str, str] = {}  # client-visible lifecycle id -> its current record key
        self.listeners: list[Listener] = []
        self.available = True  # False -> every event answers 503 (engine dead / disabled)
        self.counters: dict[str, int] = {}
        self._next_deadline = math.inf

    # ---- internals --------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _notify(self, rec: LifecycleRecord, transition: str) -> None:
        for fn in self.listeners:
            fn(rec, transition)

    def _deadline_of(self, rec: LifecycleRecord) -> float:
        cfg = self.config
        if rec.state is LifecycleState.TERMINAL:
            return (rec.terminal_at or 0.0) + cfg.tombstone_seconds
        if rec.state is LifecycleState.AWAITING_START:
            return (rec.completed_at or 0.0) + cfg.attach_seconds
        if rec.state is LifecycleState.ACTIVE:
            return min(rec.safety_deadline, rec.release_deadline)
        if rec.state is LifecycleState.RELEASED:
            return rec.safety_deadline
        return math.inf

    def _touch(self, rec: LifecycleRecord) -> None:
        self._next_deadline = min(self._next_deadline, self._deadline_of(rec))

    def _terminate(self, rec: LifecycleRecord, cause: str, now: float) -> None:
        rec.state = LifecycleState.TERMINAL
        rec.cause = cause
        rec.terminal_at = now
        self._count(cause)
        self._touch(rec)
        self._notify(rec, cause)

    # ---- request-side events ----------------------------------------------------------------
    def associate(
        self, lifecycle_id: str, metadata: AgentMetadata, handle: str | None = None
    ) -> LifecycleRecord:
        """Open a record (key ``lifecycle_id``, the request id) when a request that may call a
        tool arrives. ``handle`` is the client-visible id (default: the key); reusing it is a
        409 only while its previous request is still generating (a genuinely concurrent reuse).
        Otherwise the previous record is superseded: the agent made a new call, so its tool
        call (if one was open) has ended."""
        self.expire()
        handle = handle or lifecycle_id
        prev = self.records.get(self.handles.get(handle, ""))
        if lifecycle_id in self.records or (
            prev is not None and prev.state is LifecycleState.GENERATING
        ):
            self._count("conflict")
            raise RequestRejected(
                "metadata.lifecycle_id",
                f"lifecycle id {handle!r} is in use by a request that is still generating",
                409,
                "duplicate_lifecycle_id",
            )
        if prev is not None and not prev.terminal:
            self.supersede(prev)
        rec = LifecycleRecord(lifecycle_id, metadata, self.clock(), handle=handle)
        self.records[lifecycle_id] = rec
        self.handles[handle] = lifecycle_id
        self._count("associated")
        return rec

    def resolve(self, lifecycle_id: str) -> str:
        """The record key a lifecycle id names: a record key itself, else the record a
        client-visible handle points at now (itself when unmapped)."""
        if lifecycle_id in self.records:
            return lifecycle_id
        return self.handles.get(lifecycle_id, lifecycle_id)

    def supersede(self, rec: LifecycleRecord) -> None:
        """The agent is back with a new call: an open stall finishes (its duration is
        learned), a record whose tool never started ends as ``superseded``."""
        if rec.terminal:
            return
        if rec.started_at is not None:
            self.stall_finished(rec.lifecycle_id)
        else:
            self._terminate(rec, "superseded", self.clock())

    def end(self, lifecycle_id: str, cause: str) -> None:
        """End a live record that will see no tool call (e.g. an inferred lifecycle whose
        response made none); listeners release whatever they hold for it."""
        rec = self.records.get(lifecycle_id)
        if rec is not None and not rec.terminal:
            self._terminate(rec, cause, self.clock())

    def generation_finished(self, lifecycle_id: str, ok: bool = True, snapshot: Any = None) -> None:
        """The request's generation ended; ``ok=False`` (abort/error) ends the lifecycle."""
        self.expire()
        rec = self.records.get(lifecycle_id)
        if rec is None or rec.terminal:
            return
        now = self.clock()
        if not ok:
            self._terminate(rec, "aborted", now)
            return
        rec.completed_at = now
        rec.snapshot = snapshot
        self._count("completed")
        if rec.state is LifecycleState.GENERATING:
            rec.state = LifecycleState.AWAITING_START
        self._touch(rec)
        self._notify(rec, "completed")

    def set_h2d_estimate(self, rec: LifecycleRecord, seconds: float) -> None:
        """Move the release deadline so the upload has ``1.25 x`` its estimated time."""
        rec.h2d_estimate = seconds
        if rec.started_at is not None:
            lead = max(self.config.release_lead_s, 1.25 * seconds)
            rec.release_deadline = rec.started_at + rec.predicted - lead
            self._touch(rec)

    # ---- client events ----------------------------------------------------------------------
    def handle(self, event: LifecycleEvent | Any) -> tuple[Disposition, dict[str, Any]]:
        """Apply one ``POST /v1/tokencake/events`` body (a dict is validated first: a bad one
        answers ``INVALID`` with the error; :meth:`LifecycleEvent.parse` raises instead)."""
        if not isinstance(event, LifecycleEvent):
            try:
                event = LifecycleEvent.parse(event)
            except RequestRejected as exc:
                body = event if isinstance(event, dict) else {}
                lid, name = body.get("lifecycle_id"), body.get("event")
                return Disposition.INVALID, {  # never echo a huge or non-string value back
                    "lifecycle_id": lid if _valid_id(lid) else None,
                    "event": name if name in ("stall_started", "stall_finished") else None,
                    "disposition": "invalid",
                    "error": exc.message,
                    "param": exc.param,
                }
        name, lid = event.event, event.lifecycle_id
        if not self.available:
            return Disposition.UNAVAILABLE, {
                "lifecycle_id": lid,
                "event": name,
                "disposition": "unavailable",
            }
        if name == "stall_started":
            disp = self.stall_started(lid, event.kind, event.estimated_duration_s)
        else:
            disp = self.stall_finished(lid)
        rec = self.records.get(self.resolve(lid))
        if rec is None:
            return disp, {
                "lifecycle_id": lid,
                "event": name,
                "state": "unknown",
                "disposition": disp.value,
            }
        return disp, rec.body(name, disp)

    def stall_started(
        self,
        lifecycle_id: str,
        kind: str = "stall",
        estimate: float | None = None,
        source: str = "explicit",
    ) -> Disposition:
        self.expire()
        lifecycle_id = self.resolve(lifecycle_id)
        rec = self.records.get(lifecycle_id)
        if rec is None:
            self._count("unknown")
            return Disposition.UNKNOWN
        if rec.started_at is not None and rec.source == "inferred" and source == "explicit":
            if rec.terminal:
                self._count("conflict")
                return Disposition.CONFLICT
            # Explicit wins: the client's kind and estimate replace the inferred ones; the
            # stall started when the response ended (the inferred start time stays).
            rec.source, rec.kind, rec.estimate = source, kind, estimate
            self._predict(rec)
            self._count("explicit_override")
            self._notify(rec, "started")
            return Disposition.APPLIED
        if rec.started_at is not None:
            same = rec.kind == kind and rec.estimate == estimate
            self._count("duplicate" if same else "conflict")
            return Disposition.DUPLICATE if same else Disposition.CONFLICT
        if rec.terminal:
            self._count("conflict")
            return Disposition.CONFLICT
        rec.started_at, rec.kind, rec.estimate, rec.source = self.clock(), kind, estimate, source
        rec.state = LifecycleState.ACTIVE
        self._predict(rec)
        self._count("started")
        self._notify(rec, "started")
        return Disposition.APPLIED

    def _predict(self, rec: LifecycleRecord) -> None:
        """Predicted duration, safety deadline and release deadline of a started stall."""
        m, cfg = rec.metadata, self.config
        start = rec.started_at or 0.0
        rec.predicted = self.predictor.predict(m.agent_type, m.agent_name, rec.kind or "stall",
                                               rec.estimate)  # fmt: skip
        rec.safety_deadline = start + min(
            max(cfg.safety_factor * rec.predicted, cfg.safety_min_s), cfg.safety_max_s
        )
        self.set_h2d_estimate(rec, rec.h2d_estimate)
        self._touch(rec)

    def stall_finished(self, lifecycle_id: str) -> Disposition:
        self.expire()
        lifecycle_id = self.resolve(lifecycle_id)
        rec = self.records.get(lifecycle_id)
        if rec is None:
            self._count("unknown")
            return Disposition.UNKNOWN
        if rec.started_at is None:
            self._count("conflict")
            return Disposition.CONFLICT
        if rec.terminal:
            disp = Disposition.DUPLICATE if rec.finish_seen else Disposition.LATE_FINISH
            self._count(disp.value)
            return disp
        now = self.clock()
        m = rec.metadata
        self.predictor.learn(m.agent_type, m.agent_name, rec.kind or "stall", now - rec.started_at)
        rec.finish_seen = True
        self._terminate(rec, "finished", now)
        return Disposition.APPLIED

    def fail(self, lifecycle_id: str) -> None:
        """End a lifecycle whose data made the engine fail (cause ``error``); the listeners
        release whatever they hold for it."""
        rec = self.records.get(lifecycle_id)
        if rec is not None and not rec.terminal:
            self._terminate(rec, "error", self.clock())

    def check_record(self, rec: LifecycleRecord) -> None:
        """Raise if a record holds data the schedulers cannot use (the fault probe)."""
        rec.metadata.validate()
        for name in ("predicted", "h2d_estimate"):
            v = getattr(rec, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"lifecycle {name} is {v!r}")
        if rec.estimate is not None and not 0 < rec.estimate <= MAX_ESTIMATED_DURATION_S:
            raise ValueError(f"lifecycle estimate is {rec.estimate!r}")

    def reset(self) -> None:
        """Host-tier reset: every live lifecycle ends as ``reset`` (history is kept)."""
        now = self.clock()
        for rec in list(self.records.values()):
            if not rec.terminal:
                self._terminate(rec, "reset", now)

    # ---- lazy expiry ------------------------------------------------------------------------
    def expire(self) -> None:
        """Apply every deadline that has passed; cheap when none has (a cached minimum)."""
        now = self.clock()
        if now < self._next_deadline:
            return
        nxt = math.inf
        for lid, rec in list(self.records.items()):
            st = rec.state
            if st is LifecycleState.TERMINAL:
                if now >= (rec.terminal_at or 0.0) + self.config.tombstone_seconds:
                    del self.records[lid]
                    if self.handles.get(rec.handle) == lid:
                        del self.handles[rec.handle]
                    continue
            elif st is LifecycleState.AWAITING_START:
                if now >= (rec.completed_at or 0.0) + self.config.attach_seconds:
                    self._terminate(rec, "expired", now)
            elif st in (LifecycleState.ACTIVE, LifecycleState.RELEASED):
                if now >= rec.safety_deadline:
                    self._terminate(rec, "expired", now)
                elif st is LifecycleState.ACTIVE and now >= rec.release_deadline:
                    rec.state = LifecycleState.RELEASED
                    self._count("released")
                    self._notify(rec, "released")
            nxt = min(nxt, self._deadline_of(rec))
        self._next_deadline = nxt

    @property
    def next_deadline(self) -> float:
        """Earliest time :meth:`expire` has something to apply (``math.inf``: none)."""
        return self._next_deadline

    def live(self) -> list[LifecycleRecord]:
        return [r for r in self.records.values() if not r.terminal]
