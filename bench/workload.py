"""Multi-agent workload format: applications as DAGs of LLM calls with tool stalls.

A :class:`Workload` is a list of :class:`Application` s, each arriving at ``arrival_s``
and consisting of :class:`Node` s (one LLM call each, or a local input/collect step)
connected by dependency edges. A node may call a :class:`ToolCall` after its LLM call;
the tool result is appended to the context its successors see.

Context composition is append-only (``append-only-conversation-v1``, the authors'
``conversation-tools`` semantics): a node's prompt is the composed context of its
predecessors followed by its own ``prompt_text`` / ``prompt_tokens``. See
``bench/WORKLOAD_FORMAT.md`` for the full schema, units and defaults.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

FORMAT_NAME = "tokencake-workload"
FORMAT_VERSION = 1

#: Node kinds: ``llm`` issues a model call; ``input`` / ``collect`` are local steps
#: (no model call) that only contribute text to the composed context.
NODE_KINDS = ("llm", "input", "collect")

#: Default decode-speed assumption for predicted node costs (seconds per output token).
DEFAULT_SECONDS_PER_OUTPUT_TOKEN = 0.02
#: Estimate used for a tool that sends no estimate; the reference server falls back to
#: 1 s when it has no history for the tool kind.
DEFAULT_UNKNOWN_TOOL_ESTIMATE_S = 1.0


def _check_finite_nonneg(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _check_int_nonneg(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_keys(obj: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    """Reject unknown fields so that typos in hand-written workloads fail loudly."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            raise ValueError(f"{where}: unknown field {key!r}")


def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing required field {key!r}")
    return obj[key]


@dataclass(frozen=True)
class ToolCall:
    """A tool invoked after a node's LLM call; the node's agent stalls until it returns.

    Attributes:
        kind: Tool kind (e.g. ``search``, ``file_write``); servers keep duration history
            per kind.
        true_duration_s: Seconds the tool really takes (the simulated wait).
        estimate_s: Duration estimate sent to the server, or ``None`` to send none.
        result_tokens: Synthetic result length in tokens (mutually exclusive with
            ``result_text``).
        result_text: Literal result text appended to successors' context.
        duration_noise: Relative standard deviation of multiplicative noise the runner
            may apply to ``true_duration_s`` at run time (0 = deterministic).
        preserve_generation: Whether the node's generated text stays in the context
            after the tool returns (``False``: successors see only the tool result).
    """

    kind: str
    true_duration_s: float
    estimate_s: float | None = None
    result_tokens: int | None = None
    result_text: str | None = None
    duration_noise: float = 0.0
    preserve_generation: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError("ToolCall.kind must be a non-empty string")
        _check_finite_nonneg("ToolCall.true_duration_s", self.true_duration_s)
        if self.estimate_s is not None:
            _check_finite_nonneg("ToolCall.estimate_s", self.estimate_s)
        if self.result_tokens is not None:
            _check_int_nonneg("ToolCall.result_tokens", self.result_tokens)
        if self.result_text is not None and not isinstance(self.result_text, str):
            raise TypeError("ToolCall.result_text must be a string")
        if self.result_tokens is not None and self.result_text is not None:
            raise ValueError("ToolCall: set at most one of result_tokens and result_text")
        _check_finite_nonneg("ToolCall.duration_noise", self.duration_noise)
        if not isinstance(self.preserve_generation, bool):
            raise TypeError("ToolCall.preserve_generation must be a bool")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (every field written, so files are self-describing)."""
        return {
            "kind": self.kind,
            "true_duration_s": self.true_duration_s,
            "estimate_s": self.estimate_s,
            "result_tokens": self.result_tokens,
            "result_text": self.result_text,
            "duration_noise": self.duration_noise,
            "preserve_generation": self.preserve_generation,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "tool") -> ToolCall:
        """Parse a JSON object; unknown fields raise ``ValueError`` naming the field."""
        _check_keys(obj, _TOOL_FIELDS, where)
        return cls(
            kind=_require(obj, "kind", where),
            true_duration_s=_require(obj, "true_duration_s", where),
            estimate_s=obj.get("estimate_s"),
            result_tokens=obj.get("result_tokens"),
            result_text=obj.get("result_text"),
            duration_noise=obj.get("duration_noise", 0.0),
            preserve_generation=obj.get("preserve_generation", True),
        )


_TOOL_FIELDS = (
    "kind",
    "true_duration_s",
    "estimate_s",
    "result_tokens",
    "result_text",
    "duration_noise",
    "preserve_generation",
)


@dataclass(frozen=True)
class Node:
    """One agent step: an LLM call (or a local input/collect step), optionally followed by a tool.

    Attributes:
        id: Unique id within the application.
        agent_type: Agent class (e.g. ``programmer``); schedulers keep per-type history.
        agent_name: Agent instance name; defaults to ``id``.
        importance: Static agent importance (higher = more important).
        deps: Ids of predecessor nodes, in composition order.
        prompt_text: This node's own text appended to the composed context (role
            template, or the initial context for a root). Exclusive with ``prompt_tokens``.
        prompt_tokens: Synthetic length of that text in tokens.
        max_tokens: Output budget of the LLM call (0 for local nodes).
        tool: Tool called after this node's LLM call, or ``None``.
        join_group: Name of the join this node feeds, or ``None``.
        kind: ``llm`` (model call), ``input`` or ``collect`` (local, no model call).
        metadata: Free-form JSON-compatible annotations (e.g. the authors' scheduling
            hints); not interpreted by the format.
    """

    id: str
    agent_type: str
    importance: float
    deps: tuple[str, ...] = ()
    agent_name: str = ""
    prompt_text: str | None = None
    prompt_tokens: int | None = None
    max_tokens: int = 0
    tool: ToolCall | None = None
    join_group: str | None = None
    kind: str = "llm"
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("Node.id must be a non-empty string")
        if not isinstance(self.agent_type, str) or not self.agent_type:
            raise ValueError(f"Node {self.id!r}: agent_type must be a non-empty string")
        if not self.agent_name:
            object.__setattr__(self, "agent_name", self.id)
        if isinstance(self.deps, str):
            raise TypeError(f"Node {self.id!r}: deps must be a sequence of ids, not a string")
        object.__setattr__(self, "deps", tuple(self.deps))
        if any(not isinstance(d, str) for d in self.deps):
            raise TypeError(f"Node {self.id!r}: deps must be strings")
        if len(set(self.deps)) != len(self.deps):
            raise ValueError(f"Node {self.id!r}: duplicate dependency")
        if self.id in self.deps:
            raise ValueError(f"Node {self.id!r}: depends on itself")
        _check_finite_nonneg(f"Node {self.id!r}: importance", self.importance)
        if self.prompt_text is not None and not isinstance(self.prompt_text, str):
            raise TypeError(f"Node {self.id!r}: prompt_text must be a string")
        if self.prompt_tokens is not None:
            _check_int_nonneg(f"Node {self.id!r}: prompt_tokens", self.prompt_tokens)
        if self.prompt_text is not None and self.prompt_tokens is not None:
            raise ValueError(f"Node {self.id!r}: set at most one of prompt_text and prompt_tokens")
        _check_int_nonneg(f"Node {self.id!r}: max_tokens", self.max_tokens)
        if self.kind not in NODE_KINDS:
            raise ValueError(
                f"Node {self.id!r}: kind must be one of {NODE_KINDS}, got {self.kind!r}"
            )
        if self.kind == "llm" and self.max_tokens < 1:
            raise ValueError(f"Node {self.id!r}: an llm node needs max_tokens >= 1")
        if self.kind != "llm" and (self.max_tokens != 0 or self.tool is not None):
            # Local steps issue no model call, so there is nothing to generate or stall on.
            raise ValueError(f"Node {self.id!r}: {self.kind} nodes take max_tokens=0 and no tool")
        if self.tool is not None and not isinstance(self.tool, ToolCall):
            raise TypeError(f"Node {self.id!r}: tool must be a ToolCall")
        if self.join_group is not None and (
            not isinstance(self.join_group, str) or not self.join_group
        ):
            raise ValueError(f"Node {self.id!r}: join_group must be None or a non-empty string")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"Node {self.id!r}: metadata must be a dict")

    @property
    def is_llm(self) -> bool:
        """Whether this node issues a model call."""
        return self.kind == "llm"

    def predicted_cost_s(
        self,
        seconds_per_output_token: float = DEFAULT_SECONDS_PER_OUTPUT_TOKEN,
        unknown_tool_estimate_s: float = DEFAULT_UNKNOWN_TOOL_ESTIMATE_S,
    ) -> float:
        """Predicted node duration: decode time of ``max_tokens`` plus the tool estimate.

        Only information a client would send is used (``estimate_s``, not the true
        duration), so the critical path matches what a server could compute.
        """
        cost = seconds_per_output_token * self.max_tokens
        if self.tool is not None:
            est = self.tool.estimate_s
            cost += unknown_tool_estimate_s if est is None else est
        return cost

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "id": self.id,
            "agent_type": self.agent_type,
            "agent_name": self.agent_name,
            "kind": self.kind,
            "importance": self.importance,
            "deps": list(self.deps),
            "prompt_text": self.prompt_text,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "tool": None if self.tool is None else self.tool.to_dict(),
            "join_group": self.join_group,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "node") -> Node:
        """Parse a JSON object; unknown fields raise ``ValueError`` naming the field."""
        _check_keys(obj, _NODE_FIELDS, where)
        node_id = _require(obj, "id", where)
        tool = obj.get("tool")
        return cls(
            id=node_id,
            agent_type=_require(obj, "agent_type", where),
            agent_name=obj.get("agent_name") or "",
            kind=obj.get("kind", "llm"),
            importance=obj.get("importance", 1.0),
            deps=tuple(obj.get("deps", ())),
            prompt_text=obj.get("prompt_text"),
            prompt_tokens=obj.get("prompt_tokens"),
            max_tokens=obj.get("max_tokens", 0),
            tool=None if tool is None else ToolCall.from_dict(tool, f"{where}.tool"),
            join_group=obj.get("join_group"),
            metadata=dict(obj.get("metadata") or {}),
        )


_NODE_FIELDS = (
    "id",
    "agent_type",
    "agent_name",
    "kind",
    "importance",
    "deps",
    "prompt_text",
    "prompt_tokens",
    "max_tokens",
    "tool",
    "join_group",
    "metadata",
)


#: How an application's client talks to the server: ``annotated`` sends agent metadata with
#: every call and posts stall_started / stall_finished around every tool; ``tool-calling``
#: sends neither (a plain OpenAI tool-calling client): the server infers each tool call from
#: the protocol (the response's tool calls, the next request's tool results; issue 14).
CLIENTS = ("annotated", "tool-calling")


@dataclass(frozen=True)
class Application:
    """One multi-agent application: a DAG of nodes arriving at ``arrival_s``.

    Validated at construction: node ids are unique, every dependency exists and the
    graph is acyclic. Graph queries take node ids.
    """

    app_id: str
    arrival_s: float
    nodes: tuple[Node, ...]
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    client: str = "annotated"  # see CLIENTS

    def __post_init__(self) -> None:
        if not isinstance(self.app_id, str) or not self.app_id:
            raise ValueError("Application.app_id must be a non-empty string")
        if self.client not in CLIENTS:
            raise ValueError(
                f"Application {self.app_id!r}: client must be one of {', '.join(CLIENTS)}, "
                f"got {self.client!r}"
            )
        _check_finite_nonneg(f"Application {self.app_id!r}: arrival_s", self.arrival_s)
        object.__setattr__(self, "nodes", tuple(self.nodes))
        if not self.nodes:
            raise ValueError(f"Application {self.app_id!r}: needs at least one node")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"Application {self.app_id!r}: metadata must be a dict")
        seen: set[str] = set()
        for node in self.nodes:
            if not isinstance(node, Node):
                raise TypeError(f"Application {self.app_id!r}: nodes must be Node instances")
            if node.id in seen:
                raise ValueError(f"Application {self.app_id!r}: duplicate node id {node.id!r}")
            seen.add(node.id)
        for node in self.nodes:
            for dep in node.deps:
                if dep not in seen:
                    raise ValueError(
                        f"Application {self.app_id!r}: node {node.id!r} depends on "
                        f"unknown node {dep!r}"
                    )
        # Computing the order raises on a cycle.
        _ = self._topo

    # -- graph structure -------------------------------------------------------------

    @cached_property
    def _by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    @cached_property
    def _succs(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for d in n.deps:
                out[d].append(n.id)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def _topo(self) -> tuple[str, ...]:
        # Kahn's algorithm, taking ready nodes in declaration order so the order is
        # stable and matches the file for already-sorted inputs.
        indeg = {n.id: len(n.deps) for n in self.nodes}
        index = {n.id: i for i, n in enumerate(self.nodes)}
        ready = sorted((nid for nid, d in indeg.items() if d == 0), key=index.__getitem__)
        order: list[str] = []
        while ready:
            nid = ready.pop(0)
            order.append(nid)
            newly = []
            for s in self._succs[nid]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    newly.append(s)
            ready = sorted(ready + newly, key=index.__getitem__)
        if len(order) != len(self.nodes):
            stuck = sorted(nid for nid, d in indeg.items() if d > 0)
            raise ValueError(f"Application {self.app_id!r}: dependency cycle among {stuck}")
        return tuple(order)

    def node(self, node_id: str) -> Node:
        """The node with id ``node_id`` (``KeyError`` if absent)."""
        return self._by_id[node_id]

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Node ids in declaration order."""
        return tuple(n.id for n in self.nodes)

    @property
    def num_edges(self) -> int:
        """Number of dependency edges."""
        return sum(len(n.deps) for n in self.nodes)

    @property
    def llm_nodes(self) -> tuple[Node, ...]:
        """Nodes that issue a model call."""
        return tuple(n for n in self.nodes if n.is_llm)

    def edges(self) -> tuple[tuple[str, str], ...]:
        """All ``(dep, node)`` edges in declaration order."""
        return tuple((d, n.id) for n in self.nodes for d in n.deps)

    def topological_order(self) -> tuple[str, ...]:
        """Node ids in a dependency-respecting order (stable w.r.t. declaration order)."""
        return self._topo

    def successors(self, node_id: str) -> tuple[str, ...]:
        """Ids of nodes that depend on ``node_id``."""
        return self._succs[node_id]

    def in_degree(self, node_id: str) -> int:
        """Number of dependencies of ``node_id`` (0 for roots)."""
        return len(self._by_id[node_id].deps)

    def out_degree(self, node_id: str) -> int:
        """Number of nodes depending on ``node_id`` (0 for sinks)."""
        return len(self._succs[node_id])

    @cached_property
    def _depths(self) -> dict[str, int]:
        depth: dict[str, int] = {}
        for nid in self._topo:
            deps = self._by_id[nid].deps
            depth[nid] = 1 + max((depth[d] for d in deps), default=0)
        return depth

    @cached_property
    def _remaining(self) -> dict[str, int]:
        rem: dict[str, int] = {}
        for nid in reversed(self._topo):
            rem[nid] = 1 + max((rem[s] for s in self._succs[nid]), default=0)
        return rem

    def depth(self, node_id: str) -> int:
        """Nodes on the longest root→``node_id`` path, counting both ends (roots: 1).

        Matches the authors' ``depth`` / ``dependency_depth`` annotation.
        """
        return self._depths[node_id]

    def remaining_depth(self, node_id: str) -> int:
        """Nodes on the longest ``node_id``→sink path, counting both ends (sinks: 1).

        Matches the authors' ``remaining_depth`` (= ``app_max_depth`` − depth on the
        longest chain).
        """
        return self._remaining[node_id]

    @property
    def max_depth(self) -> int:
        """Number of nodes on the longest root→sink chain."""
        return max(self._depths.values())

    # -- critical path ---------------------------------------------------------------

    def _path_lengths(
        self, cost: Callable[[Node], float]
    ) -> tuple[dict[str, float], dict[str, float], float]:
        """(longest cost ending at node incl. node, longest starting at node incl. node, total)."""
        to: dict[str, float] = {}
        for nid in self._topo:
            n = self._by_id[nid]
            to[nid] = cost(n) + max((to[d] for d in n.deps), default=0.0)
        frm: dict[str, float] = {}
        for nid in reversed(self._topo):
            frm[nid] = cost(self._by_id[nid]) + max((frm[s] for s in self._succs[nid]), default=0.0)
        return to, frm, max(to.values())

    def critical_path_length_s(
        self,
        seconds_per_output_token: float = DEFAULT_SECONDS_PER_OUTPUT_TOKEN,
        unknown_tool_estimate_s: float = DEFAULT_UNKNOWN_TOOL_ESTIMATE_S,
    ) -> float:
        """Predicted duration of the longest path (no queueing), in seconds."""
        _, _, total = self._path_lengths(
            lambda n: n.predicted_cost_s(seconds_per_output_token, unknown_tool_estimate_s)
        )
        return total

    def critical_path_nodes(
        self,
        seconds_per_output_token: float = DEFAULT_SECONDS_PER_OUTPUT_TOKEN,
        unknown_tool_estimate_s: float = DEFAULT_UNKNOWN_TOOL_ESTIMATE_S,
    ) -> frozenset[str]:
        """Ids of all nodes on some longest predicted path (ties: every tied path counts).

        Node cost = ``seconds_per_output_token * max_tokens`` + tool ``estimate_s``
        (``unknown_tool_estimate_s`` when the tool sends none).
        """
        to, frm, total = self._path_lengths(
            lambda n: n.predicted_cost_s(seconds_per_output_token, unknown_tool_estimate_s)
        )
        tol = 1e-9 * max(1.0, total)
        return frozenset(
            nid
            for nid in self._topo
            if to[nid]
            + frm[nid]
            - self._by_id[nid].predicted_cost_s(seconds_per_output_token, unknown_tool_estimate_s)
            >= total - tol
        )

    def critical_path(
        self,
        node_id: str,
        seconds_per_output_token: float = DEFAULT_SECONDS_PER_OUTPUT_TOKEN,
        unknown_tool_estimate_s: float = DEFAULT_UNKNOWN_TOOL_ESTIMATE_S,
    ) -> bool:
        """Whether ``node_id`` lies on a longest predicted path (see :meth:`critical_path_nodes`)."""
        if node_id not in self._by_id:
            raise KeyError(node_id)
        return node_id in self.critical_path_nodes(
            seconds_per_output_token, unknown_tool_estimate_s
        )

    # -- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "app_id": self.app_id,
            "arrival_s": self.arrival_s,
            "client": self.client,
            "metadata": self.metadata,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "application") -> Application:
        """Parse a JSON object; unknown fields raise ``ValueError`` naming the field."""
        _check_keys(obj, _APP_FIELDS, where)
        app_id = _require(obj, "app_id", where)
        where = f"{where}[{app_id!r}]"
        nodes_raw = _require(obj, "nodes", where)
        if not isinstance(nodes_raw, list):
            raise ValueError(f"{where}: nodes must be a list")
        return cls(
            app_id=app_id,
            arrival_s=obj.get("arrival_s", 0.0),
            nodes=tuple(Node.from_dict(n, f"{where}.nodes[{i}]") for i, n in enumerate(nodes_raw)),
            metadata=dict(obj.get("metadata") or {}),
            client=obj.get("client", "annotated"),
        )


_APP_FIELDS = ("app_id", "arrival_s", "client", "metadata", "nodes")


@dataclass(frozen=True)
class Workload:
    """A named, seeded set of applications (the unit a benchmark run replays)."""

    name: str
    applications: tuple[Application, ...]
    seed: int | None = None
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("Workload.name must be a non-empty string")
        object.__setattr__(self, "applications", tuple(self.applications))
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise TypeError("Workload.seed must be an int or None")
        if not isinstance(self.description, str):
            raise TypeError("Workload.description must be a string")
        if not isinstance(self.metadata, dict):
            raise TypeError("Workload.metadata must be a dict")
        ids = [a.app_id for a in self.applications]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Workload {self.name!r}: duplicate application ids")
        for a in self.applications:
            if not isinstance(a, Application):
                raise TypeError("Workload.applications must be Application instances")

    @property
    def num_llm_calls(self) -> int:
        """Total model calls across all applications."""
        return sum(len(a.llm_nodes) for a in self.applications)

    def application(self, app_id: str) -> Application:
        """The application with id ``app_id`` (``KeyError`` if absent)."""
        for a in self.applications:
            if a.app_id == app_id:
                return a
        raise KeyError(app_id)

    def sorted_by_arrival(self) -> tuple[Application, ...]:
        """Applications ordered by arrival time (stable on ties)."""
        return tuple(sorted(self.applications, key=lambda a: a.arrival_s))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including the format header."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "seed": self.seed,
            "description": self.description,
            "metadata": self.metadata,
            "applications": [a.to_dict() for a in self.applications],
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Workload:
        """Parse a JSON object; unknown fields raise ``ValueError`` naming the field."""
        where = "workload"
        _check_keys(obj, _WORKLOAD_FIELDS, where)
        fmt = obj.get("format", FORMAT_NAME)
        if fmt != FORMAT_NAME:
            raise ValueError(f"{where}: format must be {FORMAT_NAME!r}, got {fmt!r}")
        version = obj.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: unsupported version {version!r}")
        apps_raw = _require(obj, "applications", where)
        if not isinstance(apps_raw, list):
            raise ValueError(f"{where}: applications must be a list")
        return cls(
            name=_require(obj, "name", where),
            seed=obj.get("seed"),
            description=obj.get("description", ""),
            metadata=dict(obj.get("metadata") or {}),
            applications=tuple(
                Application.from_dict(a, f"{where}.applications[{i}]")
                for i, a in enumerate(apps_raw)
            ),
        )

    def to_json(self, path: str | Path) -> None:
        """Write the workload as UTF-8 JSON (lossless; see :meth:`from_json`)."""
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> Workload:
        """Load a workload written by :meth:`to_json` or by hand (schema in WORKLOAD_FORMAT.md)."""
        with Path(path).open(encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


_WORKLOAD_FIELDS = (
    "format",
    "version",
    "name",
    "seed",
    "description",
    "metadata",
    "applications",
)
