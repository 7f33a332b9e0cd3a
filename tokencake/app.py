"""The application DAG API: LLM agent nodes, ``FuncNode`` tools, edges and joins.

An :class:`App` is a DAG of :class:`Agent` nodes. Each agent is one LLM call (a prompt template
and a token budget) optionally followed by one tool call (:class:`FuncNode`: a Python callable or
coroutine with a ``predict_time`` and optional named stages). Edges are data dependencies; a node
with several predecessors is a *join*.

Context composition is append-only (the paper's ``append-only-conversation-v1``): a successor's
prompt is its predecessor's prompt + the predecessor's output + its tool result + the successor's
template, so the successor's prompt extends a prefix the engine has already cached. A join keeps
the predecessors' shared prefix once, then appends each branch's own suffix in declared order.

:meth:`App.analyze` derives the scheduling metadata the server needs from the graph alone (the
server never infers the DAG from prompts): depth, remaining depth, degrees, the critical path
from predicted times, join groups, fan-out width and similarity. The runtime adds the per-run
fields (lifecycle ids, application timing).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ToolFn = Callable[["ToolCall"], "str | Awaitable[str]"]

#: Predicted LLM seconds per output token, used only to weigh the critical path.
DEFAULT_SECONDS_PER_TOKEN = 0.01


@dataclass(frozen=True)
class Stage:
    """A named internal stage of a tool with its predicted duration (seconds)."""

    name: str
    predict_time: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("stage name must be non-empty")
        if not self.predict_time >= 0:
            raise ValueError(f"stage {self.name!r}: predict_time must be >= 0")


@dataclass(frozen=True)
class FuncNode:
    """A tool an agent calls after its generation.

    ``fn(call: ToolCall)`` returns the tool's result text (or a coroutine of it); a sync
    callable runs in a worker thread so it never blocks the event loop. ``predict_time`` is
    the developer's estimate in seconds (default: the sum of the stages' times); it becomes the
    ``estimated_duration_s`` of the ``stall_started`` event. ``name`` is the event's ``kind``.
    """

    name: str
    fn: ToolFn
    predict_time: float | None = None
    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("FuncNode name must be non-empty")
        if not callable(self.fn):
            raise TypeError(f"FuncNode {self.name!r}: fn must be callable")
        stages = tuple(s if isinstance(s, Stage) else Stage(*s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if len({s.name for s in stages}) != len(stages):
            raise ValueError(f"FuncNode {self.name!r}: stage names must be unique")
        if self.predict_time is None and stages:
            object.__setattr__(self, "predict_time", sum(s.predict_time for s in stages))
        if self.predict_time is not None and not self.predict_time > 0:
            raise ValueError(f"FuncNode {self.name!r}: predict_time must be > 0")


@dataclass
class ToolCall:
    """What a tool function receives: the calling agent's name, prompt and output, the app's
    inputs, and :meth:`stage` to report progress through its declared stages."""

    agent: str
    prompt: str
    output: str
    inputs: dict[str, str]
    stage_times: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str) -> None:
        """Mark the start of stage ``name`` (times are recorded in the run's result)."""
        self.stage_times[name] = time.monotonic()


@dataclass(frozen=True)
class Agent:
    """One LLM node. ``template`` is appended to the composed context; ``{key}`` placeholders
    are filled from the app inputs. ``importance`` defaults to the node's depth (as in the
    authors' workloads)."""

    name: str
    agent_type: str
    template: str
    max_tokens: int = 64
    importance: float | None = None
    tool: FuncNode | None = None
    memory_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("agent name must be non-empty")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"agent {self.name!r}: max_tokens must be an integer >= 1")
        if self.importance is not None and not self.importance >= 0:
            raise ValueError(f"agent {self.name!r}: importance must be >= 0")


@dataclass(frozen=True)
class NodeInfo:
    """Graph-derived scheduling metadata of one node (names follow the wire format)."""

    depth: int
    remaining_depth: int
    in_degree: int
    out_degree: int
    critical_path: bool
    near_completion: bool
    join_group: str
    fanout_width: int
    similarity: float
    importance: float
    predicted_s: float  # this node's own predicted time (LLM + tool)
    offload_eligible: bool
    reusable_prefix: bool

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("predicted_s")
        d["dependency_depth"] = self.depth
        return d


@dataclass(frozen=True)
class GraphInfo:
    """Whole-application facts: per-node metadata, max depth, the critical path and its time."""

    nodes: dict[str, NodeInfo]
    max_depth: int
    critical_path: tuple[str, ...]
    critical_time_s: float
    order: tuple[str, ...]  # a topological order (declaration order breaks ties)


class App:
    """A multi-agent application: agents plus dependency edges.

    >>> app = App("demo", system_prompt="You are helpful.")
    >>> app.agent("plan", "planner", "Plan: {task}")
    >>> app.agent("do", "worker", "Do it.", after=["plan"])
    """

    def __init__(self, name: str, system_prompt: str = "") -> None:
        self.name = name
        self.system_prompt = system_prompt
        self.agents: dict[str, Agent] = {}
        self.preds: dict[str, list[str]] = {}

    # ---- building -----------------------------------------------------------------------------
    def add(self, agent: Agent, after: Sequence[str] = ()) -> Agent:
        """Add an agent after the named predecessors (declared order = join order)."""
        if agent.name in self.agents:
            raise ValueError(f"duplicate agent name {agent.name!r}")
        self.agents[agent.name] = agent
        self.preds[agent.name] = []
        for p in after:
            self.edge(p, agent.name)
        return agent

    def agent(
        self,
        name: str,
        agent_type: str,
        template: str,
        *,
        max_tokens: int = 64,
        importance: float | None = None,
        tool: FuncNode | None = None,
        after: Sequence[str] = (),
        memory_weight: float = 1.0,
    ) -> Agent:
        """Shorthand for ``add(Agent(...), after)``."""
        return self.add(
            Agent(name, agent_type, template, max_tokens, importance, tool, memory_weight), after
        )

    def edge(self, src: str, dst: str) -> None:
        """``dst`` depends on ``src`` (sees its prompt, output and tool result)."""
        for n in (src, dst):
            if n not in self.agents:
                raise ValueError(f"unknown agent {n!r}")
        if src == dst:
            raise ValueError(f"self-loop on {src!r}")
        if src in self.preds[dst]:
            raise ValueError(f"duplicate edge {src!r} -> {dst!r}")
        self.preds[dst].append(src)
        try:
            self._topo()
        except ValueError:
            self.preds[dst].remove(src)
            raise

    @property
    def succs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.agents}
        for dst, ps in self.preds.items():
            for p in ps:
                out[p].append(dst)
        return out

    def _topo(self) -> list[str]:
        indeg = {n: len(ps) for n, ps in self.preds.items()}
        succs = self.succs
        ready = [n for n in self.agents if indeg[n] == 0]
        order: list[str] = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for s in succs[n]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    ready.append(s)
        if len(order) != len(self.agents):
            raise ValueError("the application graph has a cycle")
        return order

    # ---- analysis -----------------------------------------------------------------------------
    def analyze(self, seconds_per_token: float = DEFAULT_SECONDS_PER_TOKEN) -> GraphInfo:
        """Scheduling metadata from the graph and predicted times.

        * ``depth``: 1 for sources, else 1 + the deepest predecessor; ``remaining_depth``: edges
          on the longest path to a sink.
        * ``critical_path``: nodes on the longest path by predicted time, where a node costs
          ``max_tokens * seconds_per_token`` plus its tool's ``predict_time``.
        * ``join_group``: for each join J (in order), the nodes on some but not all branches
          into J, and J itself, get J's name (first join wins).
        * ``fanout_width``: the widest fan-out among a node's predecessors (1 for sources);
          ``similarity``: 1 / (nodes at the same depth).
        * ``near_completion``: ``remaining_depth <= max_depth // 4``.
        * ``offload_eligible``: the node calls a tool; ``reusable_prefix``: a successor extends
          its context.
        """
        if not self.agents:
            raise ValueError("the application has no agents")
        order = self._topo()
        succs = self.succs
        depth: dict[str, int] = {}
        for n in order:
            depth[n] = 1 + max((depth[p] for p in self.preds[n]), default=0)
        remaining: dict[str, int] = {}
        for n in reversed(order):
            remaining[n] = max((1 + remaining[s] for s in succs[n]), default=0)
        max_depth = max(depth.values())

        cost = {n: self._predicted(a, seconds_per_token) for n, a in self.agents.items()}
        # Longest weighted path ending at each node; ties go to the earlier-declared predecessor.
        best: dict[str, float] = {}
        via: dict[str, str | None] = {}
        for n in order:
            prev = max(self.preds[n], key=lambda p: best[p], default=None)
            best[n] = cost[n] + (best[prev] if prev is not None else 0.0)
            via[n] = prev
        end: str | None = max(order, key=lambda n: best[n])
        critical_time = best[end]
        path: list[str] = []
        while end is not None:
            path.append(end)
            end = via[end]
        path.reverse()

        ancestors: dict[str, set[str]] = {}
        for n in order:
            ancestors[n] = (
                set().union(*({p} | ancestors[p] for p in self.preds[n]))
                if self.preds[n]
                else set()
            )
        group: dict[str, str] = {}
        for j in order:
            ps = self.preds[j]
            if len(ps) < 2:
                continue
            common = set.intersection(*({p} | ancestors[p] for p in ps))
            for m in sorted(ancestors[j] - common, key=order.index) + [j]:
                group.setdefault(m, j)

        width_at: dict[int, int] = {}
        for d in depth.values():
            width_at[d] = width_at.get(d, 0) + 1
        nodes = {}
        for n, a in self.agents.items():
            nodes[n] = NodeInfo(
                depth=depth[n],
                remaining_depth=remaining[n],
                in_degree=len(self.preds[n]),
                out_degree=len(succs[n]),
                critical_path=n in path,
                near_completion=remaining[n] <= max_depth // 4,
                join_group=group.get(n, ""),
                fanout_width=max((len(succs[p]) for p in self.preds[n]), default=1),
                similarity=1.0 / width_at[depth[n]],
                importance=float(a.importance if a.importance is not None else depth[n]),
                predicted_s=cost[n],
                offload_eligible=a.tool is not None,
                reusable_prefix=bool(succs[n]),
            )
        return GraphInfo(nodes, max_depth, tuple(path), critical_time, tuple(order))

    @staticmethod
    def _predicted(a: Agent, seconds_per_token: float) -> float:
        tool = (
            a.tool.predict_time if a.tool is not None and a.tool.predict_time is not None else 0.0
        )
        return a.max_tokens * seconds_per_token + tool

    # ---- context composition --------------------------------------------------------------------
    def render(self, name: str, inputs: dict[str, str]) -> str:
        """The agent's template with ``{key}`` placeholders filled from ``inputs``."""
        text = self.agents[name].template
        for k, v in inputs.items():  # plain replace: templates may contain literal braces (code)
            text = text.replace("{" + k + "}", v)
        return text


def compose(system_prompt: str, contexts: Sequence[str], suffix: str) -> str:
    """Append-only composition of a node's prompt.

    ``contexts`` are the predecessors' full contexts (prompt + output + tool result) in declared
    order. A source node starts from ``system_prompt``. A join keeps the predecessors' longest
    common prefix once, then each branch's own suffix in order, so the shared part stays a
    cacheable prefix.
    """
    if not contexts:
        base = system_prompt
    elif len(contexts) == 1:
        base = contexts[0]
    else:
        common = _common_prefix(contexts)
        base = common + "".join(c[len(common) :] for c in contexts)
    return base + suffix


def _common_prefix(texts: Sequence[str]) -> str:
    first, last = min(texts), max(texts)  # the common prefix of all = that of the extremes
    i = 0
    while i < len(first) and first[i] == last[i]:
        i += 1
    # Cut at a line boundary so a branch suffix never starts mid-line.
    cut = first.rfind("\n", 0, i) + 1 if i < len(first) else i
    return first[:cut]
