"""Per-request agent metadata (paper digest §8.1, ``TokenCakeMetadata``).

A request may carry hints about the agent that issued it: its type and name, its place in the
application DAG, and whether its KV may be preserved across a tool call. The hints only change
*when* tokens are computed, never *which*. Requests without metadata keep the baseline
behaviour (``coerce_metadata(None) is None``).

Validation is strict on types (a bool is not an int, an int is accepted for a float) and on
ranges (:data:`RANGES`; strings at most 256 characters, ``lifecycle_id`` at most 128 and free of
control characters); every error is a :class:`RequestRejected` whose ``param`` is
``metadata.<field>``, so the server answers 400 naming the field. Unknown keys are ignored, as the paper's ``extra="allow"``
does; up to 32 small scalar ones are kept in ``extra``, larger values are dropped.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.limits import (
    MAX_DURATION_S,
    MAX_EXTRA_KEYS,
    MAX_GRAPH_INT,
    MAX_ID_CHARS,
    MAX_IMPORTANCE,
    MAX_MEMORY_WEIGHT,
    MAX_NAME_CHARS,
    MAX_TIMESTAMP_S,
    MIN_SIMILARITY,
    check_id,
    check_int,
    check_number,
    check_string,
    is_small_scalar,
)


def _reject(name: str, problem: str) -> RequestRejected:
    """A 400 naming the metadata field (``param`` is ``metadata.<name>``)."""
    return RequestRejected(f"metadata.{name}", f"metadata field {name!r} {problem}")


# Always matched in full (``fullmatch``): ``$`` would accept a trailing newline.
_LIFECYCLE_RE = re.compile(r"tc-[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}")

# Documented range (inclusive) of every numeric field; see limits.py for why bounds exist.
RANGES: dict[str, tuple[float, float]] = {
    "importance": (0.0, MAX_IMPORTANCE),
    "similarity": (0.0, 1.0),  # and 0 or >= MIN_SIMILARITY
    "memory_weight": (0.0, MAX_MEMORY_WEIGHT),
    "application_started_at_s": (0.0, MAX_TIMESTAMP_S),
    "application_start_offset_s": (0.0, MAX_DURATION_S),
    "application_elapsed_s": (0.0, MAX_DURATION_S),
    "depth": (0, MAX_GRAPH_INT),
    "in_degree": (0, MAX_GRAPH_INT),
    "out_degree": (0, MAX_GRAPH_INT),
    "application_max_depth": (0, MAX_GRAPH_INT),
    "remaining_depth": (0, MAX_GRAPH_INT),
    "dependency_depth": (0, MAX_GRAPH_INT),
    "fanout_width": (1, MAX_GRAPH_INT),
}


def is_canonical_lifecycle_id(value: str) -> bool:
    """Whether ``value`` is ``"tc-"`` + a lowercase UUID4 hex (the paper's wire format)."""
    return _LIFECYCLE_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class AgentMetadata:
    """Agent hints of one request. ``lifecycle_id`` empty means "use the request id"."""

    lifecycle_id: str = ""
    agent_type: str = ""
    agent_name: str = ""
    importance: float = 0.0
    depth: int = 0
    in_degree: int = 0
    out_degree: int = 0
    similarity: float = 0.0
    application_started_at_s: float = 0.0
    application_start_offset_s: float = 0.0
    application_elapsed_s: float = 0.0
    application_max_depth: int = 0
    remaining_depth: int = 0
    critical_path: bool = False
    near_completion: bool = False
    join_group: str = ""
    dependency_depth: int = 0
    fanout_width: int = 1
    memory_weight: float = 1.0
    offload_eligible: bool = False
    reusable_prefix: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field against its documented range (:data:`RANGES`); raises
        :class:`RequestRejected` naming the first bad field. Also the scheduler's
        probe when a batch-wide phase fails: an instance changed behind the dataclass's back
        (``object.__setattr__``) is found here."""
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            param, label = f"metadata.{f.name}", f"metadata field {f.name!r}"
            if f.type == "str":
                limit = MAX_ID_CHARS if f.name == "lifecycle_id" else MAX_NAME_CHARS
                check_string(param, v, limit, label=label)
            elif f.type == "bool":
                if not isinstance(v, bool):
                    raise _reject(f.name, f"must be a boolean, got {type(v).__name__}")
            elif f.type == "int":
                lo, hi = RANGES[f.name]
                check_int(param, v, int(lo), int(hi), label=label)
            elif f.type == "float":
                lo, hi = RANGES[f.name]
                check_number(param, v, lo, hi, label=label)
        if 0 < self.similarity < MIN_SIMILARITY:
            raise _reject(
                "similarity", f"must be 0 or in [{MIN_SIMILARITY:g}, 1], got {self.similarity!r}"
            )
        if self.lifecycle_id:
            check_id(
                "metadata.lifecycle_id", self.lifecycle_id, label="metadata field 'lifecycle_id'"
            )
        if self.application_max_depth:
            if self.depth > self.application_max_depth:
                raise _reject("depth", "must be <= application_max_depth")
            if self.remaining_depth > self.application_max_depth:
                raise _reject("remaining_depth", "must be <= application_max_depth")
        if not isinstance(self.extra, dict):
            raise _reject("extra", "must be a dict")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict_lifecycle_id: bool = False) -> AgentMetadata:
        """Build from a JSON object. ``strict_lifecycle_id`` enforces the wire format
        (``tc-`` + UUID4 hex) when an id is given, which the HTTP server asks for; in-process callers may use any
        non-empty id."""
        if not isinstance(data, dict):
            raise RequestRejected(
                "metadata", f"metadata must be an object, got {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        # Unknown keys are ignored; a few small scalars are kept for inspection, never large
        # values (a per-request dict kept for a lifecycle's whole life must not hold MiBs).
        extra: dict[str, Any] = {}
        for k, v in data.items():
            if k in names or len(extra) >= MAX_EXTRA_KEYS:
                continue
            if isinstance(k, str) and len(k) <= MAX_NAME_CHARS and is_small_scalar(v):
                extra[k] = v
        if known.get("lifecycle_id", "") is None:
            del known["lifecycle_id"]  # null counts as absent
        if strict_lifecycle_id and "lifecycle_id" in known:
            lid = known.get("lifecycle_id")  # optional: the server makes one when absent
            if not isinstance(lid, str) or not is_canonical_lifecycle_id(lid):
                raise _reject("lifecycle_id", "must be 'tc-' followed by a lowercase UUID4 hex")
        return cls(**known, extra=extra)

    # ---- derived views used by both schedulers ----------------------------------------------
    @property
    def preservable(self) -> bool:
        """Both flags must be set before the Time Scheduler may copy this agent's KV."""
        return self.offload_eligible and self.reusable_prefix

    @property
    def type_key(self) -> str | None:
        """The agent-type key for reservations and history (None: unannotated for that purpose)."""
        return self.agent_type or None


def coerce_metadata(value: Any) -> AgentMetadata | None:
    """Normalise ``Request.metadata``: None stays None, dicts are validated (RequestRejected
    naming the field), an ``AgentMetadata`` passes through."""
    if value is None or isinstance(value, AgentMetadata):
        return value
    if isinstance(value, dict):
        return AgentMetadata.from_dict(value)
    raise RequestRejected(
        "metadata", f"metadata must be a dict or AgentMetadata, got {type(value).__name__}"
    )
