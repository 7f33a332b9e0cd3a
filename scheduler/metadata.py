"""Per-request agent metadata (paper digest §8.1, ``TokenCakeMetadata``).

A request may carry hints about the agent that issued it: its type and name, its place in the
application DAG, and whether its KV may be preserved across a tool call. The hints only change
*when* tokens are computed, never *which*. Requests without metadata keep the baseline
behaviour (``coerce_metadata(None) is None``).

Validation is strict on types (a bool is not an int, an int is accepted for a float) and every
error is a :class:`RequestRejected` whose ``param`` is ``metadata.<field>``, so the server
answers 400 naming the field. Unknown keys are
kept in ``extra`` and ignored, as the paper's ``extra="allow"`` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tokencake.scheduler.errors import RequestRejected


def _reject(name: str, problem: str) -> RequestRejected:
    """A 400 naming the metadata field (``param`` is ``metadata.<name>``)."""
    return RequestRejected(f"metadata.{name}", f"metadata field {name!r} {problem}")


_LIFECYCLE_RE = re.compile(r"^tc-[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$")


def is_canonical_lifecycle_id(value: str) -> bool:
    """Whether ``value`` is ``"tc-"`` + a lowercase UUID4 hex (the paper's wire format)."""
    return bool(_LIFECYCLE_RE.match(value))


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
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.type == "str":
                if not isinstance(v, str):
                    raise _reject(f.name, f"must be a string, got {type(v).__name__}")
            elif f.type == "bool":
                if not isinstance(v, bool):
                    raise _reject(f.name, f"must be a boolean, got {type(v).__name__}")
            elif f.type == "int":
                if not isinstance(v, int) or isinstance(v, bool):
                    raise _reject(f.name, f"must be an integer, got {type(v).__name__}")
                if v < 0:
                    raise _reject(f.name, f"must be >= 0, got {v}")
            elif f.type == "float":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise _reject(f.name, f"must be a finite number, got {v!r}")
                if v < 0:
                    raise _reject(f.name, f"must be >= 0, got {v}")
        if self.similarity > 1:
            raise _reject("similarity", f"must be in [0, 1], got {self.similarity}")
        if self.fanout_width < 1:
            raise _reject("fanout_width", f"must be >= 1, got {self.fanout_width}")
        if self.application_max_depth:
            if self.depth > self.application_max_depth:
                raise _reject("depth", "must be <= application_max_depth")
            if self.remaining_depth > self.application_max_depth:
                raise _reject("remaining_depth", "must be <= application_max_depth")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict_lifecycle_id: bool = False) -> AgentMetadata:
        """Build from a JSON object. ``strict_lifecycle_id`` enforces the wire format
        (``tc-`` + UUID4 hex), which the HTTP server asks for; in-process callers may use any
        non-empty id."""
        if not isinstance(data, dict):
            raise RequestRejected(
                "metadata", f"metadata must be an object, got {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if strict_lifecycle_id:
            lid = known.get("lifecycle_id")
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
