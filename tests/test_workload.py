"""Tests for the multi-agent workload format, the authors' loader and the generators."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

# bench/ is not an installed package; make the repo root importable under plain `pytest`
# too (pytest only puts tests/ on sys.path for rootdir-less test modules).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.authors_workload import ScaleDown, load_conversation_tools, resolve_path  # noqa: E402
from bench.generators import (  # noqa: E402
    CODE_WRITER_NUM_EDGES,
    CODE_WRITER_NUM_NODES,
    GENERATORS,
    code_writer,
    deep_research,
    deep_research_counts,
    make_workload,
    multi_turn,
)
from bench.workload import Application, Node, ToolCall, Workload  # noqa: E402

AUTHORS_FILE = resolve_path()
needs_authors = pytest.mark.skipif(not AUTHORS_FILE.exists(), reason="authors' data not present")


@pytest.fixture(scope="module")
def authors() -> Workload:
    return load_conversation_tools()


@pytest.fixture(scope="module")
def authors_raw() -> dict:
    return json.loads(AUTHORS_FILE.read_text(encoding="utf-8"))


def diamond(c_estimate: float | None = 0.0) -> Application:
    """A -> {B, C} -> D. Costs at 0.01 s/token: A 1 s, B 1 + 5 s, C 2 s + tool, D 1 s."""
    return Application(
        app_id="d",
        arrival_s=0.0,
        nodes=(
            Node(id="A", agent_type="planner", importance=1.0, prompt_tokens=50, max_tokens=100),
            Node(
                id="B",
                agent_type="worker",
                importance=2.0,
                deps=("A",),
                max_tokens=100,
                tool=ToolCall(kind="search", true_duration_s=7.0, estimate_s=5.0),
            ),
            Node(
                id="C",
                agent_type="worker",
                importance=2.0,
                deps=("A",),
                max_tokens=200,
                tool=ToolCall(kind="shell", true_duration_s=1.0, estimate_s=c_estimate),
            ),
            Node(id="D", agent_type="joiner", importance=3.0, deps=("B", "C"), max_tokens=100),
        ),
    )


# -- graph queries on a hand-computed diamond ------------------------------------------


def test_diamond_depths_degrees_and_order() -> None:
    app = diamond()
    assert app.topological_order() == ("A", "B", "C", "D")
    assert [app.depth(n) for n in "ABCD"] == [1, 2, 2, 3]
    assert [app.remaining_depth(n) for n in "ABCD"] == [3, 2, 2, 1]
    assert [app.in_degree(n) for n in "ABCD"] == [0, 1, 1, 2]
    assert [app.out_degree(n) for n in "ABCD"] == [2, 1, 1, 0]
    assert app.num_edges == 4
    assert app.max_depth == 3


def test_diamond_critical_path() -> None:
    app = diamond(c_estimate=0.0)
    # A(1) + B(1+5) + D(1) = 8 s beats A + C(2) + D = 4 s.
    assert app.critical_path_length_s(0.01) == pytest.approx(8.0)
    assert [app.critical_path(n, 0.01) for n in "ABCD"] == [True, True, False, True]
    # C sends no estimate: the fallback estimate decides. 2 + 10 = 12 s > B's 6 s.
    app2 = diamond(c_estimate=None)
    assert app2.critical_path_nodes(0.01, unknown_tool_estimate_s=10.0) == {"A", "C", "D"}
    assert app2.critical_path_length_s(0.01, unknown_tool_estimate_s=10.0) == pytest.approx(14.0)
    # A tie puts both branches on the critical path: C = 2 + 4 = 6 = B.
    app3 = diamond(c_estimate=4.0)
    assert app3.critical_path_nodes(0.01) == {"A", "B", "C", "D"}
    with pytest.raises(KeyError):
        app.critical_path("Z")


def test_topological_order_handles_unsorted_declaration() -> None:
    app = Application(
        app_id="x",
        arrival_s=0.0,
        nodes=(
            Node(id="b", agent_type="t", importance=1, deps=("a",), max_tokens=1),
            Node(id="a", agent_type="t", importance=1, max_tokens=1),
        ),
    )
    assert app.topological_order() == ("a", "b")


# -- validation ------------------------------------------------------------------------


def test_invalid_dags_rejected() -> None:
    a = Node(id="a", agent_type="t", importance=1, deps=("b",), max_tokens=1)
    b = Node(id="b", agent_type="t", importance=1, deps=("a",), max_tokens=1)
    with pytest.raises(ValueError, match="cycle"):
        Application(app_id="x", arrival_s=0, nodes=(a, b))
    with pytest.raises(ValueError, match="unknown node 'b'"):
        Application(app_id="x", arrival_s=0, nodes=(a,))
    c = Node(id="c", agent_type="t", importance=1, max_tokens=1)
    with pytest.raises(ValueError, match="duplicate node id"):
        Application(app_id="x", arrival_s=0, nodes=(c, c))
    with pytest.raises(ValueError, match="itself"):
        Node(id="a", agent_type="t", importance=1, deps=("a",), max_tokens=1)


def test_invalid_fields_rejected() -> None:
    with pytest.raises(ValueError, match="at most one"):
        Node(id="a", agent_type="t", importance=1, prompt_text="x", prompt_tokens=3, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        Node(id="a", agent_type="t", importance=1, max_tokens=0)
    with pytest.raises(ValueError, match="input nodes"):
        Node(id="a", agent_type="t", importance=1, kind="input", max_tokens=5)
    with pytest.raises(ValueError, match="true_duration_s"):
        ToolCall(kind="k", true_duration_s=-1.0)
    with pytest.raises(ValueError, match="at most one"):
        ToolCall(kind="k", true_duration_s=1.0, result_tokens=3, result_text="x")
    with pytest.raises(ValueError, match="arrival_s"):
        Application(app_id="x", arrival_s=math.nan, nodes=diamond().nodes)
    with pytest.raises(ValueError):
        ScaleDown(num_apps=0)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ((), "bogus_top"),
        (("applications", 0), "bogus_app"),
        (("applications", 0, "nodes", 1), "bogus_node"),
        (("applications", 0, "nodes", 1, "tool"), "bogus_tool"),
    ],
)
def test_unknown_field_names_the_field(path: tuple, field: str) -> None:
    d = Workload(name="w", applications=(diamond(),)).to_dict()
    target = d
    for key in path:
        target = target[key]
    target[field] = 1
    with pytest.raises(ValueError, match=field):
        Workload.from_dict(d)


# -- JSON round trip -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_json_round_trip(tmp_path: Path, name: str) -> None:
    wl = make_workload(name, num_apps=3, seed=7)
    p = tmp_path / "w.json"
    wl.to_json(p)
    back = Workload.from_json(p)
    assert back == wl
    assert back.to_dict() == wl.to_dict()
    assert back.metadata == wl.metadata


@needs_authors
def test_authors_json_round_trip(tmp_path: Path, authors: Workload) -> None:
    p = tmp_path / "authors.json"
    authors.to_json(p)
    back = Workload.from_json(p)
    assert back == authors
    assert back.to_dict() == authors.to_dict()


def test_hand_written_minimal_json_uses_defaults(tmp_path: Path) -> None:
    p = tmp_path / "min.json"
    p.write_text(
        json.dumps(
            {
                "name": "tiny",
                "applications": [
                    {
                        "app_id": "0",
                        "nodes": [
                            {"id": "a", "agent_type": "t", "max_tokens": 4},
                            {
                                "id": "b",
                                "agent_type": "t",
                                "deps": ["a"],
                                "max_tokens": 4,
                                "tool": {"kind": "k", "true_duration_s": 1},
                            },
                        ],
                    }
                ],
            }
        )
    )
    wl = Workload.from_json(p)
    a = wl.applications[0]
    assert a.arrival_s == 0.0 and wl.seed is None
    assert a.node("a").importance == 1.0 and a.node("a").agent_name == "a"
    assert a.node("b").tool == ToolCall(kind="k", true_duration_s=1)


# -- the authors' file -----------------------------------------------------------------


@needs_authors
def test_authors_structure(authors: Workload, authors_raw: dict) -> None:
    assert authors.name == "code-paper-pressure"
    assert authors.seed == 42
    assert len(authors.applications) == 24
    assert [a.app_id for a in authors.applications] == [str(i) for i in range(24)]
    assert [a.arrival_s for a in authors.applications] == [float(i) for i in range(24)]
    assert authors.num_llm_calls == 648
    for app, raw in zip(authors.applications, authors_raw["applications"], strict=True):
        assert len(app.nodes) == 29 and app.num_edges == 36
        assert len(app.llm_nodes) == 27
        assert sum(n.max_tokens for n in app.nodes) == 6464
        tools = [n.tool for n in app.nodes if n.tool is not None]
        assert len(tools) == 18
        assert sum(t.true_duration_s for t in tools) == pytest.approx(66.9)
        assert sum(t.estimate_s is not None for t in tools) == 15
        assert app.max_depth == 16
        assert app.node("start_mcp").kind == "input"
        assert app.node("start_mcp").prompt_text == raw["initial_input"]
        assert app.node("end_mcp").kind == "collect"
        assert app.node("search_1").tool.result_text == raw["tool_results"]["search_1"]
        assert app.metadata["context_token_count"] == raw["context_token_count"]
        # Our graph queries agree with the authors' annotations.
        for n in app.nodes:
            m = n.metadata
            assert app.depth(n.id) == m["depth"] == n.importance
            assert app.remaining_depth(n.id) == m["remaining_depth"]
            if n.deps:  # the authors count the external input as one in-edge of the root
                assert app.in_degree(n.id) == m["in_degree"]
            if app.out_degree(n.id):  # ... and the final output as one out-edge of the sink
                assert app.out_degree(n.id) == m["out_degree"]
            # Every node the authors mark critical is critical under our predicted costs,
            # except the hand-picked external-eval chain (shorter than the reviser chain).
            if m["critical_path"] and n.id not in ("external_eval", "user_confirm", "test_node"):
                assert app.critical_path(n.id)
    assert (
        authors.applications[0].node("search_1").tool
        != authors.applications[1].node("search_1").tool
    )
    assert authors.metadata["input_composition"] == "append-only-conversation-v1"


@needs_authors
def test_authors_scale_down(authors: Workload) -> None:
    sd = ScaleDown(
        num_apps=3,
        max_context_chars=100,
        tool_time_scale=0.1,
        max_tokens_cap=32,
        arrival_spacing_s=2.0,
    )
    small = load_conversation_tools(scale=sd)
    assert [a.arrival_s for a in small.applications] == [0.0, 2.0, 4.0]
    for big, app in zip(authors.applications[:3], small.applications, strict=False):
        assert app.edges() == big.edges()
        assert [n.agent_type for n in app.nodes] == [n.agent_type for n in big.nodes]
        for bn, n in zip(big.nodes, app.nodes, strict=True):
            if bn.prompt_text is not None:
                assert n.prompt_text == bn.prompt_text[:100]
            assert n.max_tokens == min(bn.max_tokens, 32)
            if bn.tool is not None:
                assert n.tool.true_duration_s == pytest.approx(bn.tool.true_duration_s * 0.1)
                assert len(n.tool.result_text) <= 100
    assert len(authors.applications[0].node("start_mcp").prompt_text) > 17000
    burst = load_conversation_tools(scale=ScaleDown(num_apps=2, arrival_spacing_s=None))
    assert [a.arrival_s for a in burst.applications] == [0.0, 0.0]


@needs_authors
def test_code_writer_generator_matches_authors_dag(authors: Workload) -> None:
    ref = authors.applications[0]
    gen = code_writer(num_apps=1, seed=0).applications[0]
    assert gen.edges() == ref.edges()
    for g, r in zip(gen.nodes, ref.nodes, strict=True):
        assert (g.id, g.agent_type, g.kind, g.importance, g.max_tokens, g.join_group) == (
            r.id,
            r.agent_type,
            r.kind,
            r.importance,
            r.max_tokens,
            r.join_group,
        )
        assert (g.tool is None) == (r.tool is None)
        if g.tool is not None:
            for attr in ("kind", "true_duration_s", "estimate_s", "preserve_generation"):
                assert getattr(g.tool, attr) == getattr(r.tool, attr)
        for key in ("critical_path", "offload_eligible", "near_completion", "memory_weight"):
            assert g.metadata[key] == r.metadata[key]
        assert g.metadata["similarity"] == pytest.approx(r.metadata["similarity"], abs=1e-3)


# -- generators ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_deterministic(name: str) -> None:
    a = make_workload(name, num_apps=4, seed=3)
    b = make_workload(name, num_apps=4, seed=3)
    c = make_workload(name, num_apps=4, seed=4)
    assert a == b
    assert a != c
    # Application i has its own stream: more apps leave the first ones unchanged.
    longer = make_workload(name, num_apps=6, seed=3, poisson=False)
    shorter = make_workload(name, num_apps=4, seed=3, poisson=False)
    assert longer.applications[:4] == shorter.applications


def test_code_writer_counts_and_scaling() -> None:
    wl = code_writer(num_apps=5, arrival_rate=0.5, output_scale=0.5, tool_time_scale=0.1)
    assert [a.arrival_s for a in wl.applications] == [0.0, 2.0, 4.0, 6.0, 8.0]
    for app in wl.applications:
        assert len(app.nodes) == CODE_WRITER_NUM_NODES == 29
        assert app.num_edges == CODE_WRITER_NUM_EDGES == 36
        assert sum(n.max_tokens for n in app.nodes) == 3232
        assert sum(n.tool.true_duration_s for n in app.nodes if n.tool) == pytest.approx(6.69)
        first = app.node("start_mcp").prompt_tokens
        assert 4850 <= first <= 5451
        for n in app.nodes:
            if n.tool is not None:
                assert 150 <= n.tool.result_tokens <= 400


def test_code_writer_poisson_arrivals() -> None:
    wl = code_writer(num_apps=200, arrival_rate=2.0, poisson=True, seed=1)
    arr = [a.arrival_s for a in wl.applications]
    assert arr[0] == 0.0 and arr == sorted(arr)
    assert arr[-1] / 199 == pytest.approx(0.5, rel=0.2)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_deep_research_shape(n: int) -> None:
    wl = deep_research(num_apps=3, num_searchers=n, seed=2)
    nodes, edges = deep_research_counts(n)
    for app in wl.applications:
        assert (len(app.nodes), app.num_edges) == (nodes, edges)
        assert app.in_degree("synthesizer") == n
        assert app.out_degree("planner") == n
        assert app.max_depth == 5
        searches = [x.tool for x in app.nodes if x.tool is not None]
        assert len(searches) == n
        assert all(t.kind == "web_search" and 0.5 <= t.true_duration_s <= 120 for t in searches)
        assert all(t.estimate_s == 8.0 for t in searches)


def test_multi_turn_statistics() -> None:
    wl = multi_turn(num_apps=300, seed=5)
    turns = [len(a.nodes) for a in wl.applications]
    assert all(2 <= t <= 64 for t in turns)
    assert sum(turns) / len(turns) == pytest.approx(11.0, rel=0.15)
    durs = []
    for app in wl.applications:
        assert app.num_edges == len(app.nodes) - 1  # a chain
        assert app.topological_order() == app.node_ids
        assert app.nodes[-1].tool is None
        durs += [n.tool.true_duration_s for n in app.nodes[:-1]]
    short = sum(d < 1.0 for d in durs) / len(durs)
    under10 = sum(d < 10.0 for d in durs) / len(durs)
    assert short == pytest.approx(0.8646, abs=0.03)
    assert under10 == pytest.approx(0.9512, abs=0.02)
    assert max(durs) >= 10.0


def _session_context(app) -> list[int]:
    """Each turn's context plus its output, as the driver composes it (append-only)."""
    out, ctx = [], 0
    for node in app.nodes:
        ctx += node.prompt_tokens + node.max_tokens
        out.append(ctx)
        ctx += node.tool.result_tokens if node.tool is not None else 0
    return out


def test_multi_turn_sessions_end_at_the_context_window() -> None:
    """Long sessions stop at the turn that would not fit the window (seed 3 has one of 60
    turns that reaches ~50k tokens uncapped): the kept turns are the uncapped session's
    first ones, the last has no tool, and every turn fits."""
    free = multi_turn(num_apps=10, seed=3, max_context_tokens=10**9)
    capped = multi_turn(num_apps=10, seed=3)
    assert max(max(_session_context(a)) for a in free.applications) > 32_768
    cut = 0
    for f, c in zip(free.applications, capped.applications, strict=True):
        assert max(_session_context(c)) <= 32_768
        assert c.nodes[-1].tool is None and c.num_edges == len(c.nodes) - 1
        if len(c.nodes) < len(f.nodes):
            cut += 1
            assert c.nodes[:-1] == f.nodes[: len(c.nodes) - 1]
            # the next turn would have overflowed the window
            assert _session_context(f)[len(c.nodes)] > 32_768
        else:
            assert c.nodes == f.nodes
    assert cut == 1
    small = multi_turn(num_apps=10, seed=3, max_context_tokens=8_000)
    assert all(max(_session_context(a)) <= 8_000 for a in small.applications)
    with pytest.raises(ValueError, match="max_context_tokens"):
        multi_turn(num_apps=1, max_context_tokens=0)


def test_make_workload_errors_and_authors() -> None:
    with pytest.raises(ValueError, match="unknown workload generator"):
        make_workload("nope")
    with pytest.raises(ValueError, match="num_apps"):
        make_workload("code_writer", num_apps=0)
    if AUTHORS_FILE.exists():
        wl = make_workload("authors", num_apps=2, max_context_chars=50)
        assert len(wl.applications) == 2


def test_authors_tool_noise_reaches_every_tool() -> None:
    quiet = make_workload("authors", num_apps=2, max_context_chars=50)
    noisy = make_workload("authors", num_apps=2, max_context_chars=50, tool_noise=0.5)
    tools = [(q.tool, n.tool) for qa, na in zip(quiet.applications, noisy.applications, strict=True)
             for q, n in zip(qa.nodes, na.nodes, strict=True) if q.tool is not None]  # fmt: skip
    assert tools
    for q, n in tools:
        assert q.duration_noise == 0.0 and n.duration_noise == 0.5
        assert (n.true_duration_s, n.estimate_s) == (q.true_duration_s, q.estimate_s)
    assert noisy.metadata["scale_down"]["tool_noise"] == 0.5
    with pytest.raises(ValueError, match="tool_noise"):
        make_workload("authors", num_apps=1, tool_noise=-1.0)
