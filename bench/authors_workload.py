"""Loader for the Tokencake authors' ``conversation-tools`` workload file.

Converts ``shared/data/tokencake-conversation-tools.json`` (24 applications sharing one
29-node / 36-edge code-writer DAG) into a :class:`~bench.workload.Workload`, keeping the
DAG, the authors' per-node metadata, the real initial contexts, the role templates and
the fixed tool results (including the per-application ``search_1`` / ``search_2``
overrides). :class:`ScaleDown` shrinks it for small models and CPU runs.

Composition (``append-only-conversation-v1``, from the dataset README): a linear
successor's prompt is the predecessor's prompt + the predecessor's generated text (dropped
when the tool has ``preserve_generation=False``) + the tool result + the successor's
template. A join keeps the common prefix of its predecessors' contexts once, then appends
each branch suffix in ``deps`` order, then the template. In this format the template is the
node's ``prompt_text``; ``start_mcp``'s ``prompt_text`` is the application's initial input.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workload import Application, Node, ToolCall, Workload

#: Repository root (this file lives in ``<repo>/bench/``).
_REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = (
    "bench/data/tokencake-conversation-tools.json"  # vendored copy (see bench/data/README.md)
)

# Authors' node kinds map one-to-one onto ours.
_KIND_MAP = {"llm": "llm", "input": "input", "collect": "collect"}


@dataclass(frozen=True)
class ScaleDown:
    """How to shrink the authors' workload (defaults keep it as-is, arrivals at 1 app/s).

    Attributes:
        num_apps: Keep only the first ``num_apps`` applications (``None``: all 24).
        max_context_chars: Truncate every text (initial input, templates, tool results)
            to at most this many characters (``None``: no truncation).
        tool_time_scale: Multiply tool true durations and estimates by this factor.
        max_tokens_cap: Cap every LLM node's ``max_tokens`` (``None``: keep 200/400/128).
        arrival_spacing_s: Application ``i`` arrives at ``i * arrival_spacing_s`` (the
            repository's equal spacing, 1/QPS). ``None``: all arrive at ``t = 0``.
        tool_noise: ``duration_noise`` of every tool (the runner draws each true duration
            around it, the client's estimate unchanged; 0: the recorded durations).
    """

    num_apps: int | None = None
    max_context_chars: int | None = None
    tool_time_scale: float = 1.0
    max_tokens_cap: int | None = None
    arrival_spacing_s: float | None = 1.0
    tool_noise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_apps", "max_context_chars", "max_tokens_cap"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ScaleDown.{name} must be None or an int >= 1, got {v!r}")
        if not (math.isfinite(self.tool_time_scale) and self.tool_time_scale >= 0):
            raise ValueError(f"ScaleDown.tool_time_scale must be >= 0, got {self.tool_time_scale}")
        if not (math.isfinite(self.tool_noise) and self.tool_noise >= 0):
            raise ValueError(f"ScaleDown.tool_noise must be >= 0, got {self.tool_noise}")
        if self.arrival_spacing_s is not None and not (
            math.isfinite(self.arrival_spacing_s) and self.arrival_spacing_s >= 0
        ):
            raise ValueError(
                f"ScaleDown.arrival_spacing_s must be None or >= 0, got {self.arrival_spacing_s}"
            )

    def text(self, s: str) -> str:
        """Apply ``max_context_chars`` to one text."""
        return s if self.max_context_chars is None else s[: self.max_context_chars]

    def tokens(self, max_tokens: int) -> int:
        """Apply ``max_tokens_cap`` to one LLM budget (local nodes keep 0)."""
        if self.max_tokens_cap is None or max_tokens == 0:
            return max_tokens
        return min(max_tokens, self.max_tokens_cap)


def resolve_path(path: str | Path = DEFAULT_PATH) -> Path:
    """Resolve a relative ``path`` against the repository root (absolute paths pass through)."""
    p = Path(path)
    return p if p.is_absolute() else (_REPO_ROOT / p).resolve()


def _convert_node(
    raw: dict[str, Any],
    templates: dict[str, str],
    app: dict[str, Any],
    scale: ScaleDown,
) -> Node:
    name = raw["name"]
    meta = dict(raw["metadata"])
    # Keep the authors' composition annotations next to their scheduling hints.
    meta["template"] = raw["template"]
    meta["composition"] = raw["composition"]
    if raw["kind"] == "input":
        prompt_text: str | None = app["initial_input"]
    elif raw["template"] is not None:
        prompt_text = templates[raw["template"]]
    else:
        prompt_text = None
    tool = None
    if raw["tool"] is not None:
        t = raw["tool"]
        result = app.get("tool_results", {}).get(name, t["result"])
        est = meta.get("expected_tool_stall_s")
        tool = ToolCall(
            kind=t["kind"],
            true_duration_s=float(t["duration_s"]) * scale.tool_time_scale,
            estimate_s=None if est is None else float(est) * scale.tool_time_scale,
            result_text=scale.text(result),
            duration_noise=scale.tool_noise,
            preserve_generation=bool(t["preserve_generation"]),
        )
    return Node(
        id=name,
        agent_type=raw["type"],
        agent_name=name,
        kind=_KIND_MAP[raw["kind"]],
        importance=float(meta["priority"]),
        deps=tuple(raw["predecessors"]),
        prompt_text=None if prompt_text is None else scale.text(prompt_text),
        max_tokens=scale.tokens(int(raw["max_tokens"])),
        tool=tool,
        join_group=meta.get("join_group") or None,
        metadata=meta,
    )


def load_conversation_tools(
    path: str | Path = DEFAULT_PATH, scale: ScaleDown | None = None
) -> Workload:
    """Load the authors' ``conversation-tools`` file as a :class:`Workload`.

    Args:
        path: The authors' JSON; a relative path is resolved against the repository root.
        scale: Optional :class:`ScaleDown`; the default keeps everything and spaces
            arrivals 1 s apart (the repository's QPS 1.0 point).

    Every application gets its own copy of the shared DAG, with ``start_mcp`` carrying the
    application's ``initial_input`` and ``search_1`` / ``search_2`` carrying its own tool
    results. The authors' top-level fields (except the DAG and applications) go into
    ``Workload.metadata``; per-application fields other than the input go into
    ``Application.metadata``.
    """
    scale = ScaleDown() if scale is None else scale
    with resolve_path(path).open(encoding="utf-8") as f:
        data = json.load(f)
    templates: dict[str, str] = data["templates"]
    apps_raw = data["applications"]
    if scale.num_apps is not None:
        apps_raw = apps_raw[: scale.num_apps]
    apps = []
    for i, app in enumerate(apps_raw):
        arrival = 0.0 if scale.arrival_spacing_s is None else i * scale.arrival_spacing_s
        nodes = tuple(_convert_node(n, templates, app, scale) for n in data["nodes"])
        meta = {k: v for k, v in app.items() if k not in ("id", "initial_input", "tool_results")}
        apps.append(
            Application(app_id=str(app["id"]), arrival_s=arrival, nodes=nodes, metadata=meta)
        )
    wl_meta = {
        k: v for k, v in data.items() if k not in ("nodes", "applications", "templates", "name")
    }
    wl_meta["templates"] = templates
    wl_meta["scale_down"] = {
        "num_apps": scale.num_apps,
        "max_context_chars": scale.max_context_chars,
        "tool_time_scale": scale.tool_time_scale,
        "max_tokens_cap": scale.max_tokens_cap,
        "arrival_spacing_s": scale.arrival_spacing_s,
        "tool_noise": scale.tool_noise,
    }
    return Workload(
        name=str(data["name"]),
        seed=data.get("provenance", {}).get("seed"),
        description=(
            "Tokencake authors' conversation-tools workload (code-writer DAG, "
            "append-only-conversation-v1), converted from "
            "tools/tokencake_experiments/datasets/conversation-tools.json"
        ),
        applications=tuple(apps),
        metadata=wl_meta,
    )
