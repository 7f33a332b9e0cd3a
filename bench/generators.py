"""Seeded synthetic workload generators (token-count prompts, no text).

* :func:`code_writer` reproduces the authors' 29-node / 36-edge ``conversation-tools``
  code-writer DAG (paper digest §9.2): agent types, importances (= depth), output budgets,
  tool kinds, durations and the estimates the client sends.
* :func:`deep_research`: planner → ``N`` searchers, each with a long log-normal web search
  → ``N`` summarisers → synthesis join → report.
* :func:`multi_turn`: single-agent sessions (a chain of turns) with many sub-second tool
  calls and a few long ones, following published agent-trace statistics.

Every generator is deterministic given ``seed``; application ``i`` draws from its own
stream (``[seed, 0, i]``) so adding applications does not change earlier ones. Arrivals
are equally spaced (``i / arrival_rate``, the repository's setup) or a Poisson process
(the paper's setup); the first application always arrives at ``t = 0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.workload import Application, Node, ToolCall, Workload

# ---------------------------------------------------------------------------------------
# shared helpers


def _check_common(num_apps: int, arrival_rate: float, *scales: float) -> None:
    if isinstance(num_apps, bool) or not isinstance(num_apps, int) or num_apps < 1:
        raise ValueError(f"num_apps must be an int >= 1, got {num_apps!r}")
    if not (math.isfinite(arrival_rate) and arrival_rate > 0):
        raise ValueError(f"arrival_rate must be > 0 apps/s, got {arrival_rate!r}")
    for s in scales:
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"scale factors must be finite and >= 0, got {s!r}")


def _arrivals(seed: int, num_apps: int, arrival_rate: float, poisson: bool) -> list[float]:
    """Arrival offsets in seconds; the first is 0 so runs do not start idle."""
    if not poisson:
        return [i / arrival_rate for i in range(num_apps)]
    rng = np.random.default_rng([seed, 1])
    gaps = rng.exponential(1.0 / arrival_rate, size=num_apps - 1)
    return [0.0, *(float(x) for x in np.cumsum(gaps))]


def _app_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0, index])


def _scaled(n: float, scale: float, minimum: int = 1) -> int:
    """Scale a token count, keeping at least ``minimum`` so nodes never vanish."""
    return max(minimum, round(n * scale))


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> float:
    return float(median * math.exp(sigma * rng.standard_normal()))


def _importances(table: list[tuple[str, tuple[str, ...]]]) -> dict[str, int]:
    """Depth of each node (roots 1) for a topologically ordered ``(id, deps)`` table."""
    depth: dict[str, int] = {}
    for nid, deps in table:
        depth[nid] = 1 + max((depth[d] for d in deps), default=0)
    return depth


# ---------------------------------------------------------------------------------------
# code-writer (authors' conversation-tools DAG)

# (id, agent_type, deps, max_tokens, tool or None, join_group, metadata flags)
# tool = (kind, duration_s, estimate_s or None, preserve_generation)
# flags = (offload_eligible, authors' critical_path label, near_completion, memory_weight,
#          similarity)
_Tool = tuple[str, float, float | None, bool]
_Flags = tuple[bool, bool, bool, float, float]
_CW_ROW = tuple[str, str, tuple[str, ...], int, _Tool | None, str | None, _Flags]


def _code_writer_table() -> list[_CW_ROW]:
    t = 1.0 / 3.0
    rows: list[_CW_ROW] = [
        ("start_mcp", "text", (), 0, None, None, (False, True, False, 1.0, 1.0)),
        ("architect_1", "architect", ("start_mcp",), 200, None, None, (False, True, False, 1.0, 1.0)),
        ("search_1", "mcp_search", ("architect_1",), 128, ("search", 4.0, 4.0, True), None,
         (True, True, False, 1.0, 1.0)),
        ("judger_1", "mcp_conditional_execution", ("search_1",), 128,
         ("conditional_execution", 0.4, None, True), None, (True, True, False, 1.0, 1.0)),
        ("architect_2", "architect", ("judger_1",), 200, None, None, (False, True, False, 1.0, 1.0)),
        ("search_2", "mcp_search", ("architect_2",), 128, ("search", 4.0, 4.0, True), None,
         (True, True, False, 1.0, 1.0)),
        ("judger_2", "mcp_conditional_execution", ("search_2",), 128,
         ("conditional_execution", 0.4, None, True), None, (True, True, False, 1.0, 1.0)),
        ("file_write_plan", "mcp_file_write", ("judger_2",), 128, ("file_write", 0.1, 0.1, True),
         None, (True, True, False, 1.0, 1.0)),
    ]  # fmt: skip
    for k in (1, 2, 3):
        cp = k == 1
        rows += [
            (f"programmer_{k}_validate_patch", "programmer", ("file_write_plan",), 400,
             ("tool_call", 8.0, 8.0, True), "implementation_review", (True, cp, False, 1.6, t)),
            (f"programmer_{k}_repair", "programmer", (f"programmer_{k}_validate_patch",), 400,
             None, "implementation_review", (False, cp, False, 1.7, t)),
            (f"code_write_{k}", "mcp_file_write", (f"programmer_{k}_repair",), 128,
             ("file_write", 0.1, 0.1, True), "implementation_review", (True, cp, False, 1.0, t)),
        ]  # fmt: skip
    writes = ("code_write_1", "code_write_2", "code_write_3")
    rows += [
        ("reviewer_1", "reviewer", writes, 200, None, "revision", (False, True, False, 2.0, 0.5)),
        ("reviewer_2", "reviewer", writes, 200, None, "revision", (False, False, False, 2.0, 0.5)),
    ]
    for j in (1, 2):
        cp = j == 1
        rows += [
            (f"reviser_{j}_validate_patch", "reviser", ("reviewer_1", "reviewer_2"), 400,
             ("tool_call", 10.0, 10.0, True), "final_merge", (True, cp, False, 1.6, 0.5)),
            (f"reviser_{j}_repair", "reviser", (f"reviser_{j}_validate_patch",), 400, None,
             "final_merge", (False, cp, True, 2.2, 0.5)),
            (f"revised_code_write_{j}", "mcp_file_write", (f"reviser_{j}_repair",), 128,
             ("file_write", 0.1, 0.1, False), "final_merge", (False, cp, True, 1.0, 0.5)),
        ]  # fmt: skip
    rows += [
        ("external_eval", "mcp_external_tool_eval", ("reviewer_2",), 128,
         ("external_tool_eval", 4.5, 4.5, True), "final_merge", (True, True, False, 2.0, 1.0)),
        ("user_confirm", "mcp_user_confirm", ("external_eval",), 128,
         ("user_confirm", 3.5, None, True), "final_merge", (True, True, True, 1.0, 1.0)),
        ("test_node", "mcp_external_test", ("user_confirm",), 128, ("test", 5.5, 5.5, False),
         "final_merge", (False, True, True, 2.2, 1.0)),
        ("end_mcp", "text", ("test_node", "revised_code_write_1", "revised_code_write_2"), 0, None,
         "final_merge", (False, True, True, 1.0, 1.0)),
    ]  # fmt: skip
    return rows


CODE_WRITER_NUM_NODES = 29
CODE_WRITER_NUM_EDGES = 36


def code_writer(
    num_apps: int = 24,
    arrival_rate: float = 1.0,
    poisson: bool = False,
    context_scale: float = 1.0,
    output_scale: float = 1.0,
    tool_time_scale: float = 1.0,
    seed: int = 0,
    tool_noise: float = 0.0,
) -> Workload:
    """Synthetic copy of the authors' ``conversation-tools`` code-writer workload.

    Args:
        num_apps: Number of applications (the authors run 24).
        arrival_rate: Applications per second (QPS; the authors sweep 0.05–1.0).
        poisson: Poisson arrivals (paper) instead of equal spacing (repository).
        context_scale: Multiplies all prompt and tool-result token counts (initial
            context ≈ 300–800-token task + ≈4.6k-token code blob; ~20-token templates;
            150–400-token tool results).
        output_scale: Multiplies every ``max_tokens`` (200 / 400 / 128; 6,464 per DAG).
        tool_time_scale: Multiplies tool durations and estimates.
        seed: RNG seed.
        tool_noise: ``duration_noise`` written into every tool (runner-side jitter).

    Returns:
        A workload of ``num_apps`` applications, each with 29 nodes and 36 edges;
        importance = depth (2–15 for LLM nodes), as in the authors' metadata.
    """
    _check_common(num_apps, arrival_rate, context_scale, output_scale, tool_time_scale, tool_noise)
    table = _code_writer_table()
    depth = _importances([(r[0], r[2]) for r in table])
    arrivals = _arrivals(seed, num_apps, arrival_rate, poisson)
    apps = []
    for i in range(num_apps):
        rng = _app_rng(seed, i)
        nodes = []
        for nid, atype, deps, max_tok, tool, jg, flags in table:
            if nid == "start_mcp":
                task = int(rng.integers(300, 801))
                blob = int(rng.integers(4550, 4651))
                prompt = _scaled(task + blob, context_scale)
                kind = "input"
            elif nid == "end_mcp":
                prompt = _scaled(10, context_scale)
                kind = "collect"
            else:
                prompt = _scaled(int(rng.integers(15, 26)), context_scale)
                kind = "llm"
            tc = None
            if tool is not None:
                tkind, dur, est, keep = tool
                tc = ToolCall(
                    kind=tkind,
                    true_duration_s=dur * tool_time_scale,
                    estimate_s=None if est is None else est * tool_time_scale,
                    result_tokens=_scaled(int(rng.integers(150, 401)), context_scale),
                    duration_noise=tool_noise,
                    preserve_generation=keep,
                )
            off, cp, nc, mw, sim = flags
            nodes.append(
                Node(
                    id=nid,
                    agent_type=atype,
                    kind=kind,
                    importance=float(depth[nid]),
                    deps=deps,
                    prompt_tokens=prompt,
                    max_tokens=0 if max_tok == 0 else _scaled(max_tok, output_scale),
                    tool=tc,
                    join_group=jg,
                    metadata={
                        "offload_eligible": off,
                        "critical_path": cp,
                        "near_completion": nc,
                        "memory_weight": mw,
                        "similarity": sim,
                    },
                )
            )
        apps.append(Application(app_id=str(i), arrival_s=arrivals[i], nodes=tuple(nodes)))
    return Workload(
        name="code_writer",
        seed=seed,
        description=(
            "Synthetic conversation-tools code-writer DAG (29 nodes, 36 edges, 27 LLM calls, "
            "18 tools); append-only composition"
        ),
        applications=tuple(apps),
        metadata=_params(
            num_apps=num_apps,
            arrival_rate=arrival_rate,
            poisson=poisson,
            context_scale=context_scale,
            output_scale=output_scale,
            tool_time_scale=tool_time_scale,
            tool_noise=tool_noise,
        ),
    )


def _params(**kw: Any) -> dict[str, Any]:
    return {"generator_params": kw}


# ---------------------------------------------------------------------------------------
# deep research


def deep_research_counts(num_searchers: int) -> tuple[int, int]:
    """(nodes, edges) of one :func:`deep_research` application: ``2N + 3``, ``3N + 1``."""
    return 2 * num_searchers + 3, 3 * num_searchers + 1


def deep_research(
    num_apps: int = 8,
    arrival_rate: float = 0.5,
    poisson: bool = True,
    context_scale: float = 1.0,
    output_scale: float = 1.0,
    tool_time_scale: float = 1.0,
    seed: int = 0,
    num_searchers: int = 4,
    search_median_s: float = 8.0,
    search_sigma: float = 0.8,
    tool_noise: float = 0.0,
) -> Workload:
    """Deep-research applications: planner → N searchers → N summarisers → synthesis → report.

    Each searcher writes a query (128 tokens) and then stalls on a ``web_search`` whose
    true duration is log-normal (median ``search_median_s``, log-sd ``search_sigma``,
    clipped to 0.5–120 s, before ``tool_time_scale``); the client only sends the median as
    its estimate, so long searches are mispredicted. Search results are long (1–3k
    tokens); each summariser condenses one branch; the synthesiser joins all branches.

    Token defaults (before ``context_scale`` / ``output_scale``): planner prompt 1.5–3k,
    planner output 300, summary output 300, synthesis output 600, report output 800,
    role templates ~30 tokens.
    """
    _check_common(num_apps, arrival_rate, context_scale, output_scale, tool_time_scale, tool_noise)
    if isinstance(num_searchers, bool) or not isinstance(num_searchers, int) or num_searchers < 1:
        raise ValueError(f"num_searchers must be an int >= 1, got {num_searchers!r}")
    if not (search_median_s > 0 and search_sigma >= 0):
        raise ValueError("search_median_s must be > 0 and search_sigma >= 0")
    arrivals = _arrivals(seed, num_apps, arrival_rate, poisson)
    n = num_searchers
    apps = []
    for i in range(num_apps):
        rng = _app_rng(seed, i)

        def tmpl(rng: np.random.Generator = rng) -> int:
            return _scaled(int(rng.integers(20, 41)), context_scale)

        nodes = [
            Node(
                id="planner",
                agent_type="planner",
                importance=1.0,
                prompt_tokens=_scaled(int(rng.integers(1500, 3001)), context_scale),
                max_tokens=_scaled(300, output_scale),
            )
        ]
        for k in range(1, n + 1):
            true_s = min(120.0, max(0.5, _lognormal(rng, search_median_s, search_sigma)))
            nodes.append(
                Node(
                    id=f"searcher_{k}",
                    agent_type="searcher",
                    importance=2.0,
                    deps=("planner",),
                    prompt_tokens=tmpl(),
                    max_tokens=_scaled(128, output_scale),
                    tool=ToolCall(
                        kind="web_search",
                        true_duration_s=true_s * tool_time_scale,
                        estimate_s=search_median_s * tool_time_scale,
                        result_tokens=_scaled(int(rng.integers(1000, 3001)), context_scale),
                        duration_noise=tool_noise,
                    ),
                    join_group="synthesis",
                    metadata={"branch_id": f"searcher_{k}"},
                )
            )
        for k in range(1, n + 1):
            nodes.append(
                Node(
                    id=f"summarizer_{k}",
                    agent_type="summarizer",
                    importance=3.0,
                    deps=(f"searcher_{k}",),
                    prompt_tokens=tmpl(),
                    max_tokens=_scaled(300, output_scale),
                    join_group="synthesis",
                    metadata={"branch_id": f"searcher_{k}"},
                )
            )
        nodes.append(
            Node(
                id="synthesizer",
                agent_type="synthesizer",
                importance=4.0,
                deps=tuple(f"summarizer_{k}" for k in range(1, n + 1)),
                prompt_tokens=tmpl(),
                max_tokens=_scaled(600, output_scale),
            )
        )
        nodes.append(
            Node(
                id="report",
                agent_type="writer",
                importance=5.0,
                deps=("synthesizer",),
                prompt_tokens=tmpl(),
                max_tokens=_scaled(800, output_scale),
            )
        )
        apps.append(Application(app_id=str(i), arrival_s=arrivals[i], nodes=tuple(nodes)))
    return Workload(
        name="deep_research",
        seed=seed,
        description=(
            f"Deep research: planner -> {n} searchers (log-normal web search, median "
            f"{search_median_s} s) -> summarisers -> synthesis join -> report"
        ),
        applications=tuple(apps),
        metadata=_params(
            num_apps=num_apps,
            arrival_rate=arrival_rate,
            poisson=poisson,
            context_scale=context_scale,
            output_scale=output_scale,
            tool_time_scale=tool_time_scale,
            num_searchers=num_searchers,
            search_median_s=search_median_s,
            search_sigma=search_sigma,
            tool_noise=tool_noise,
        ),
    )


# ---------------------------------------------------------------------------------------
# multi-turn agent sessions

# Tool classes: (probability key, kinds, duration range in s, estimate sent in s).
# vllm-project/router #285 (coding trace): 86.46% of same-agent requests return within
# 1 s and 95.12% within 10 s, so short/medium/long = 86.46% / 8.66% / 4.88% by default.
_SHORT_KINDS = ("read_file", "grep", "list_dir", "edit_file")
_MEDIUM_KINDS = ("bash", "python")
_LONG_KINDS = ("run_tests", "build")


def multi_turn(
    num_apps: int = 8,
    arrival_rate: float = 0.5,
    poisson: bool = True,
    context_scale: float = 1.0,
    output_scale: float = 1.0,
    tool_time_scale: float = 1.0,
    seed: int = 0,
    mean_turns: float = 11.0,
    min_turns: int = 2,
    max_turns: int = 64,
    short_tool_fraction: float = 0.8646,
    long_tool_fraction: float = 0.0488,
    tool_noise: float = 0.0,
    max_context_tokens: int = 32_768,
) -> Workload:
    """Single-agent tool-use sessions: a chain of turns, each a model call then a tool.

    Statistics (related-systems.md §2.6, §4, §5): turns per session are log-normal with
    mean ``mean_turns`` (SWE-bench ≈ 10.9, BFCL ≈ 6.3, Codex ≈ 33, AgentX ≈ 43), clipped
    to ``[min_turns, max_turns]``. Tool durations are a three-class mixture: short
    (< 1 s, log-normal median 0.15 s), medium (log-uniform 1–10 s) and long (log-uniform
    10–60 s); the estimate sent is the class's typical value (0.2 / 3.2 / 24.5 s), as a
    per-tool-kind history would give. The last turn has no tool. Contexts grow append-only
    (first prompt 2–6k tokens, tool results log-normal median 300 tokens), with small
    outputs (median 150 tokens), so input:output approaches the ≈100:1 of real traces.

    A session ends early at the turn whose context and output would not fit
    ``max_context_tokens`` (default 32,768: Qwen2.5-14B's window, the a800 preset's
    ``max_model_len``), as an agent loop stops at its model's window; that turn and the ones
    after it are dropped and the turn before becomes the last (no tool).

    Each application has ``T`` nodes and ``T - 1`` edges (a chain).
    """
    _check_common(num_apps, arrival_rate, context_scale, output_scale, tool_time_scale, tool_noise)
    if not (mean_turns >= 1 and 1 <= min_turns <= max_turns):
        raise ValueError("need mean_turns >= 1 and 1 <= min_turns <= max_turns")
    if max_context_tokens < 1:
        raise ValueError(f"max_context_tokens must be >= 1, got {max_context_tokens}")
    if not (short_tool_fraction >= 0 and long_tool_fraction >= 0) or (
        short_tool_fraction + long_tool_fraction > 1
    ):
        raise ValueError("tool fractions must be >= 0 and sum to at most 1")
    sigma_turns = 0.6
    mu_turns = math.log(mean_turns) - sigma_turns**2 / 2  # so E[T] = mean_turns before clipping
    arrivals = _arrivals(seed, num_apps, arrival_rate, poisson)
    apps = []
    for i in range(num_apps):
        rng = _app_rng(seed, i)
        turns = round(math.exp(mu_turns + sigma_turns * rng.standard_normal()))
        turns = min(max_turns, max(min_turns, turns))
        nodes: list[Node] = []
        context = 0  # tokens of the session so far: prompts, outputs, tool results
        for t in range(turns):
            if t == 0:
                prompt = _scaled(int(rng.integers(2000, 6001)), context_scale)
            else:
                prompt = _scaled(10, context_scale)
            out = _scaled(min(1024.0, max(16.0, _lognormal(rng, 150.0, 0.7))), output_scale)
            tool = None
            if t < turns - 1:
                u = float(rng.random())
                if u < short_tool_fraction:
                    kind = _SHORT_KINDS[int(rng.integers(len(_SHORT_KINDS)))]
                    dur = min(0.99, _lognormal(rng, 0.15, 0.8))
                    est = 0.2
                elif u < 1.0 - long_tool_fraction:
                    kind = _MEDIUM_KINDS[int(rng.integers(len(_MEDIUM_KINDS)))]
                    dur = 10.0 ** float(rng.uniform(0.0, 1.0))
                    est = math.sqrt(10.0)
                else:
                    kind = _LONG_KINDS[int(rng.integers(len(_LONG_KINDS)))]
                    dur = 10.0 ** float(rng.uniform(1.0, math.log10(60.0)))
                    est = math.sqrt(600.0)
                result = min(4000.0, max(10.0, _lognormal(rng, 300.0, 1.0)))
                tool = ToolCall(
                    kind=kind,
                    true_duration_s=dur * tool_time_scale,
                    estimate_s=est * tool_time_scale,
                    result_tokens=_scaled(result, context_scale),
                    duration_noise=tool_noise,
                )
            if t and context + prompt + out > max_context_tokens:
                nodes[-1] = dataclasses.replace(nodes[-1], tool=None)  # the session ends here
                break
            context += prompt + out + (tool.result_tokens or 0 if tool is not None else 0)
            nodes.append(
                Node(
                    id=f"turn_{t}",
                    agent_type="coder",
                    agent_name="coder",
                    importance=1.0,
                    deps=() if t == 0 else (f"turn_{t - 1}",),
                    prompt_tokens=prompt,
                    max_tokens=out,
                    tool=tool,
                )
            )
        apps.append(Application(app_id=str(i), arrival_s=arrivals[i], nodes=tuple(nodes)))
    return Workload(
        name="multi_turn",
        seed=seed,
        description=(
            f"Multi-turn agent sessions (mean {mean_turns} turns; tools "
            f"{short_tool_fraction:.2%} < 1 s, {long_tool_fraction:.2%} >= 10 s)"
        ),
        applications=tuple(apps),
        metadata=_params(
            num_apps=num_apps,
            arrival_rate=arrival_rate,
            poisson=poisson,
            context_scale=context_scale,
            output_scale=output_scale,
            tool_time_scale=tool_time_scale,
            mean_turns=mean_turns,
            min_turns=min_turns,
            max_turns=max_turns,
            short_tool_fraction=short_tool_fraction,
            long_tool_fraction=long_tool_fraction,
            tool_noise=tool_noise,
            max_context_tokens=max_context_tokens,
        ),
    )


# ---------------------------------------------------------------------------------------
# registry

GENERATORS: dict[str, Callable[..., Workload]] = {
    "code_writer": code_writer,
    "deep_research": deep_research,
    "multi_turn": multi_turn,
}


def make_workload(name: str, **params: Any) -> Workload:
    """Build a workload by generator name (``code_writer``, ``deep_research``, ``multi_turn``,
    or ``mixed``: one of them plus plain chat traffic, see :mod:`bench.mixed`).

    Also accepts ``authors`` (the authors' file via
    :func:`bench.authors_workload.load_conversation_tools`; params are ``path`` and the
    :class:`~bench.authors_workload.ScaleDown` fields).
    """
    if name == "authors":
        from bench.authors_workload import ScaleDown, load_conversation_tools

        path = params.pop("path", None)
        scale = ScaleDown(**params)
        return (
            load_conversation_tools(scale=scale)
            if path is None
            else load_conversation_tools(path, scale=scale)
        )
    if name == "mixed":
        from bench.mixed import mixed

        return mixed(**params)
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown workload generator {name!r}; known: {sorted(GENERATORS)} or 'authors'"
        ) from None
    return gen(**params)
