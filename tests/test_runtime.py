"""The application DAG API and runtime: graph metadata on a hand-checked diamond, append-only
composition, and an end-to-end run on the tiny model (in process and over HTTP) with real tool
coroutines bracketed by lifecycle events."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokencake.app import App, FuncNode, Stage, compose
from tokencake.async_engine import AsyncEngine
from tokencake.runtime import EngineTarget, HTTPTarget, Runtime
from tokencake.scheduler.metadata import AgentMetadata, is_canonical_lifecycle_id


def diamond(tools: bool = True) -> App:
    """A -> B, A -> C, (B, C) -> D, with tools on A, B, C."""

    async def search(call):
        call.stage("query")
        await asyncio.sleep(0.02)
        call.stage("fetch")
        return f"results for {call.agent}"

    def lookup(call):  # a sync tool runs in a worker thread
        time.sleep(0.01)
        return "fact"

    t = tools
    app = App("diamond", system_prompt="SYS\n")
    app.agent("A", "planner", "plan {task}\n", max_tokens=8,
              tool=FuncNode("search", search, stages=[Stage("query", 0.5), Stage("fetch", 0.5)]) if t else None)  # fmt: skip
    app.agent(
        "B",
        "worker",
        "b\n",
        max_tokens=8,
        after=["A"],
        tool=FuncNode("lookup", lookup, predict_time=0.2) if t else None,
    )
    app.agent(
        "C",
        "worker",
        "c\n",
        max_tokens=8,
        after=["A"],
        tool=FuncNode("search", search, predict_time=2.0) if t else None,
    )
    app.agent("D", "reviewer", "d\n", max_tokens=8, after=["B", "C"])
    return app


def test_diamond_metadata_hand_checked():
    g = diamond().analyze(seconds_per_token=0.01)
    n = g.nodes
    assert g.order == ("A", "B", "C", "D")
    assert [n[x].depth for x in "ABCD"] == [1, 2, 2, 3] and g.max_depth == 3
    assert [n[x].remaining_depth for x in "ABCD"] == [2, 1, 1, 0]
    assert [(n[x].in_degree, n[x].out_degree) for x in "ABCD"] == [(0, 2), (1, 1), (1, 1), (2, 0)]
    # Costs: A 0.08 + 1.0 (stage sum), B 0.08 + 0.2, C 0.08 + 2.0, D 0.08: C's branch is critical.
    assert n["A"].predicted_s == pytest.approx(1.08) and n["C"].predicted_s == pytest.approx(2.08)
    assert g.critical_path == ("A", "C", "D")
    assert g.critical_time_s == pytest.approx(1.08 + 2.08 + 0.08)
    assert [n[x].critical_path for x in "ABCD"] == [True, False, True, True]
    assert [n[x].join_group for x in "ABCD"] == ["", "D", "D", "D"]
    assert [n[x].fanout_width for x in "ABCD"] == [1, 2, 2, 1]
    assert [n[x].similarity for x in "ABCD"] == [1.0, 0.5, 0.5, 1.0]
    assert [n[x].near_completion for x in "ABCD"] == [False, False, False, True]
    assert [n[x].importance for x in "ABCD"] == [1.0, 2.0, 2.0, 3.0]
    assert [n[x].offload_eligible for x in "ABCD"] == [True, True, True, False]
    assert [n[x].reusable_prefix for x in "ABCD"] == [True, True, True, False]
    # Every node's metadata is valid on the wire.
    for x in "ABCD":
        AgentMetadata.from_dict({**n[x].as_dict(), "application_max_depth": g.max_depth})


def test_graph_validation():
    app = App("bad")
    app.agent("a", "t", "x")
    app.agent("b", "t", "x", after=["a"])
    with pytest.raises(ValueError, match="cycle"):
        app.edge("b", "a")
    assert app.preds["a"] == []  # the refused edge was rolled back
    with pytest.raises(ValueError, match="duplicate agent"):
        app.agent("a", "t", "x")
    with pytest.raises(ValueError, match="unknown agent"):
        app.edge("a", "zzz")
    with pytest.raises(ValueError, match="predict_time"):
        FuncNode("t", lambda c: "", predict_time=0)


def test_compose_append_only_and_join_prefix_once():
    assert compose("S\n", [], "t") == "S\nt"
    assert compose("S\n", ["S\nctx"], "t") == "S\nctxt"
    joined = compose("", ["S\nshared\nbranch one", "S\nshared\nbranch two"], "J")
    assert joined == "S\nshared\nbranch onebranch twoJ"
    assert joined.count("shared") == 1


@pytest.fixture
def async_engine(make_engine):
    engine = AsyncEngine(make_engine(num_pages=128))
    yield engine
    engine.shutdown()


def _check_run(res, app):
    nodes = res.nodes
    # Append-only: each successor's prompt extends its (single) predecessor's full context.
    assert nodes["B"].prompt.startswith(nodes["A"].context)
    assert nodes["C"].prompt.startswith(nodes["A"].context)
    d = nodes["D"].prompt
    assert d.startswith(nodes["A"].context) and d.count(nodes["A"].prompt) == 1
    assert (
        nodes["B"].context[len(nodes["A"].context) :] in d
        and nodes["C"].context[len(nodes["A"].context) :] in d
    )
    assert nodes["A"].tool_result.endswith("results for A")
    assert set(nodes["A"].stage_times) == {"query", "fetch"}
    ids = {r.metadata["lifecycle_id"] for r in nodes.values()}
    assert len(ids) == 4 and all(is_canonical_lifecycle_id(i) for i in ids)
    for r in nodes.values():
        assert r.metadata["application_max_depth"] == 3
        assert r.metadata["application_elapsed_s"] >= 0
    # Tools ran in dependency order and the successor waited for the tool.
    assert nodes["B"].submitted_at >= nodes["A"].finished_at
    assert nodes["D"].submitted_at >= max(nodes["B"].finished_at, nodes["C"].finished_at)
    for x in "ABC":
        assert nodes[x].events == [("stall_started", "applied"), ("stall_finished", "applied")]
    assert nodes["D"].events == []
    # Successor prompts reuse the predecessor's cached KV.
    assert nodes["B"].generation.cached_tokens > 0


def test_runtime_end_to_end_in_process(async_engine):
    app = diamond()
    runtime = Runtime(EngineTarget(async_engine))
    results = asyncio.run(
        runtime.run_many(
            [(app, {"task": "write a sort"}), (app, {"task": "write a parser"})], arrival_gap_s=0.01
        )
    )
    for res in results:
        _check_run(res, app)
    assert results[0].nodes["A"].metadata["application_start_offset_s"] == 0.0
    assert results[1].nodes["A"].metadata["application_start_offset_s"] == pytest.approx(0.01)
    pool = async_engine.engine.pool
    assert pool.num_used == 0
    pool.check_integrity()


def test_runtime_over_http(async_engine):
    from tokencake.server import BackgroundServer

    server = BackgroundServer(async_engine)
    try:
        app = diamond()

        async def go():
            async with HTTPTarget(server.url) as target:
                return await Runtime(target).run(app, {"task": "write a sort"})

        res = asyncio.run(go())
        _check_run(res, app)
    finally:
        server.stop()
