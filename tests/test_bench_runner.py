"""The policy-comparison runner (bench/run.py, driver.py, report.py, presets.py): a tiny
simulated run of two policies produces every metric deterministically, and a tiny real-engine
run on the random tiny model completes and reports."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bench.driver import compose, filler_tokens, node_metadata
from bench.generators import make_workload
from bench.presets import a800_qwen25_14b, make_preset
from bench.report import markdown_table
from bench.run import run_real, run_sim
from bench.variants import SUFFIXES, runner_options
from tests.conftest import TINY_ENGINE
from tokencake.scheduler.metadata import AgentMetadata

METRICS = (
    "total_e2e_s", "app_latency_mean_s", "app_latency_p50_s", "app_latency_p95_s",
    "critical_path_llm_s_mean", "ttft_after_tool_mean_s", "first_pass_prefill_tokens",
    "device_hit_tokens", "host_hit_tokens", "preemptions", "recomputed_tokens",
    "copy_out_bytes", "copy_in_bytes", "stalled_kv_resident_blocks_mean",
    "stalled_kv_pinned_blocks_mean", "effective_kv_utilization", "kv_blocks_mean",
)  # fmt: skip


def tiny_workload(seed: int = 0):
    return make_workload(
        "code_writer", num_apps=2, arrival_rate=2.0, context_scale=0.02, output_scale=0.03,
        tool_time_scale=0.1, seed=seed, tool_noise=0.1,
    )  # fmt: skip


def tiny_preset():
    p = a800_qwen25_14b()
    # A pool of 40 blocks (640 tokens) against ~150-token contexts: contention, no single
    # call too large.
    return replace(p, name="tiny", num_blocks=40, host_blocks=64, max_model_len=1024)


def test_compose_is_append_only():
    a, b = [1, 2, 3, 4], [1, 2, 5]
    assert compose([], [9]) == [9]
    assert compose([a], [9]) == a + [9]
    assert compose([a, b], [9]) == [1, 2, 3, 4, 5, 9]
    assert filler_tokens(5, "k", 100) == filler_tokens(5, "k", 100) != filler_tokens(5, "j", 100)


def test_metadata_is_valid_for_every_node():
    wl = make_workload("authors", num_apps=1, max_context_chars=50)
    app = wl.applications[0]
    for n in app.llm_nodes:
        md = AgentMetadata.from_dict(node_metadata(app, n, "x"))
        assert md.agent_type == n.agent_type and md.importance == n.importance
        assert md.depth <= md.application_max_depth


def test_sim_run_two_policies_all_metrics_deterministic():
    wl = tiny_workload()
    preset = tiny_preset()
    rows = {}
    for policy in ("vllm", "tokencake"):
        m1, r1, col = run_sim(wl, policy, preset, seed=3)
        m2, r2, _ = run_sim(wl, policy, preset, seed=3)
        for k in METRICS:
            assert k in m1, k
        assert m1["calls"] == wl.num_llm_calls
        assert all(not math.isnan(a.finished_s) for a in r1.apps)
        assert m1["total_e2e_s"] > 0 and 0 < m1["effective_kv_utilization"] <= 1
        assert col.timeline, "KV occupancy timeline sampled"
        # Deterministic given the seed (wall time aside).
        m1.pop("wall_s"), m2.pop("wall_s")
        assert m1 == m2 and r1.outputs == r2.outputs
        rows[policy] = (m1, r1)
    # Same workload, same seed: both policies generate the same tokens for every call.
    assert rows["vllm"][1].outputs == rows["tokencake"][1].outputs
    table = markdown_table([{"rate": 2.0, **m} for m, _ in rows.values()])
    assert "tokencake" in table and "E2E vs vllm" in table


def test_run_refuses_shaping_flags_a_workload_does_not_use(tmp_path):
    from bench.run import main

    cases = [("authors", ["--poisson"]), ("authors", ["--context-scale", "0.5"]),
             ("authors", ["--output-scale", "2"]), ("code-writer", ["--max-tokens-cap", "9"]),
             ("deep-research", ["--max-context-chars", "50"])]  # fmt: skip
    for workload, flags in cases:
        with pytest.raises(SystemExit, match=f"^{flags[0]}: not defined for"):
            main(["--workload", workload, "--apps", "1", "--executor", "sim",
                  "--preset", "a800-qwen2.5-14b", "--out", str(tmp_path), *flags])  # fmt: skip
    path = tmp_path / "wl.json"
    tiny_workload().to_json(path)
    with pytest.raises(SystemExit, match="^--tool-noise: not defined for a workload file"):
        main(["--workload", str(path), "--executor", "sim", "--preset", "a800-qwen2.5-14b",
              "--out", str(tmp_path), "--tool-noise", "0.5"])  # fmt: skip


def test_presets_build():
    for name in ("local", "a800-qwen2.5-14b", "h100-llama3.1-8b", "h100-llama3.1-8b-pressure"):
        p = make_preset(name)
        assert p.num_blocks > 0 and p.step.a >= 0
    with pytest.raises(ValueError, match="unknown preset"):
        make_preset("nope")


def test_h100_preset_keeps_the_authors_kv_bytes_at_its_own_prices():
    a800, h100 = a800_qwen25_14b(), make_preset("h100-llama3.1-8b")
    pool = a800.num_blocks * a800.bytes_per_block
    assert 0 <= pool - h100.num_blocks * h100.bytes_per_block < h100.bytes_per_block
    # A smaller model on faster silicon: cheaper weight reads, KV reads and prefill tokens,
    # while a copied token still costs far less than recomputing it.
    for k in ("m0", "d", "c", "e"):
        assert getattr(h100.step, k) < getattr(a800.step, k), k
    cost = h100.cost_model()
    assert cost.copy_time(1, "h2d") < 16 * h100.step.c
    pressure = make_preset("h100-llama3.1-8b-pressure")
    assert pressure.num_blocks == a800.num_blocks and pressure.step == h100.step


def test_shape_priced_step_time_follows_the_runners_calls():
    """The local preset prices a step as the runner executes it: prefill chunks and decode
    rows in separate calls, each padded to its bucket, plus the fitted overheads."""
    from types import SimpleNamespace as NS

    from bench.presets import StepModel
    from tokencake.buckets import StepBuckets

    b = StepBuckets(page_size=16, max_model_len=2048, max_num_seqs=16, max_prefill_chunk=256,
                    max_prefill_seqs=2)  # fmt: skip
    table = {",".join(map(str, sh)): 0.001 * (i + 1) for i, sh in enumerate(b.shapes())}
    m = StepModel(a=9, b=9, c=9, d=9, e=9, shape_s=table, buckets=b, overhead=0.5,
                  overhead_row=0.25, overhead_ctx=1e-3)  # fmt: skip

    def chunk(start: int, n: int, prompt: int) -> NS:
        return NS(start=start, num_tokens=n, request=NS(num_prompt_tokens=prompt))

    # three decode rows (longest context 601 tokens -> 38 pages -> the 128-page bucket) and a
    # 200-token prompt chunk (-> 256 tokens, 32 pages)
    plan = NS(chunks=[chunk(100, 1, 50), chunk(600, 1, 50), chunk(20, 1, 10), chunk(0, 200, 300)])
    assert b.call_shapes([(c.start, c.num_tokens) for c in plan.chunks]) == [(1, 256, 32),
                                                                            (4, 1, 128)]  # fmt: skip
    want = 0.5 + 0.25 * 4 + 1e-3 * (101 + 601 + 21 + 200) + table["1,256,32"] + table["4,1,128"]
    assert m.step_time(plan) == pytest.approx(want)
    # 20 decode rows need two calls (16 + 4 rows); an empty plan costs the idle quantum
    rows = [chunk(10, 1, 5)] * 20
    assert b.call_shapes([(c.start, c.num_tokens) for c in rows]) == [(16, 1, 8), (4, 1, 8)]
    assert m.step_time(NS(chunks=[])) == m.idle


def test_call_price_follows_the_longest_rows_context():
    """With full-span prices, a call costs between its two prices, linearly in its longest
    row's context over the bucket's span (capped by the model length); each call of a step
    by its own rows."""
    from types import SimpleNamespace as NS

    from bench.presets import StepModel
    from tokencake.buckets import StepBuckets

    b = StepBuckets(page_size=16, max_model_len=1000, max_num_seqs=16, max_prefill_chunk=256,
                    max_prefill_seqs=2)  # fmt: skip
    low = {",".join(map(str, sh)): 1.0 for sh in b.shapes()}
    full = {k: 3.0 for k in low}
    m = StepModel(a=9, b=9, c=9, d=9, e=9, shape_s=low, shape_full_s=full, buckets=b)

    def chunk(start: int, n: int) -> NS:
        return NS(start=start, num_tokens=n, request=NS(num_prompt_tokens=n))

    # decode rows of 101 and 301 tokens: the 32-page bucket (512 tokens); the longest row
    # reaches (301 - 1) / (512 - 1) of its span
    assert m.step_time(NS(chunks=[chunk(100, 1), chunk(300, 1)])) == pytest.approx(
        1.0 + 2.0 * 300 / 511
    )
    # a 100-token chunk at 900 (1000 tokens, the 64-page bucket is capped at 1000 tokens):
    # full price; plus a one-token decode row alone in its own call: the low price
    plan = NS(chunks=[chunk(900, 100), chunk(0, 1)])
    assert m.step_time(plan) == pytest.approx(3.0 + 1.0)
    # without full-span prices (a preset calibrated before them) a call costs its shape price
    old = StepModel(a=9, b=9, c=9, d=9, e=9, shape_s=low, buckets=b)
    assert old.step_time(NS(chunks=[chunk(100, 1), chunk(300, 1)])) == 1.0


def test_real_engine_run_two_small_apps(tiny_model):
    cfg, params, tok = tiny_model
    wl = make_workload(
        "code_writer", num_apps=2, arrival_rate=4.0, context_scale=0.01, output_scale=0.02,
        tool_time_scale=0.02, seed=1,
    )  # fmt: skip
    # The suite's tiny engine with a host tier (as tests/test_memory_hierarchy.py): the run
    # reuses the executables other tests compiled; TINY_ENGINE compiles lazily.
    engine_kwargs = {**TINY_ENGINE, "host_kv_gib": 0.01}
    for policy in ("vllm", "tokencake"):
        m, res, _ = run_real(
            wl, policy, model=(cfg, params, tok), engine_kwargs=engine_kwargs, max_wall_s=120
        )
        assert m["calls"] == wl.num_llm_calls
        assert all(not math.isnan(a.finished_s) for a in res.apps)
        for k in METRICS:
            assert k in m, k
        assert m["total_e2e_s"] > 0
        assert res.events.get("applied", 0) > 0  # lifecycle events reached the scheduler


def test_http_conversion_routes_successors_of_a_collect_node():
    """For the HTTP path, input nodes become the system prompt and a collect node (a local
    join) is dropped: its successors wait on what it waited on."""
    from bench.run import workload_apps
    from bench.workload import Application, Node, Workload

    nodes = (
        Node(id="in", agent_type="input", importance=0.0, kind="input", prompt_text="Task.\n"),
        Node(id="a", agent_type="coder", importance=1.0, deps=("in",), prompt_tokens=8, max_tokens=4),
        Node(id="b", agent_type="coder", importance=1.0, deps=("in",), prompt_tokens=8, max_tokens=4),
        Node(id="join", agent_type="collect", importance=0.0, deps=("a", "b"), kind="collect"),
        Node(id="review", agent_type="reviewer", importance=2.0, deps=("join", "a"), prompt_tokens=8,
             max_tokens=4),
    )  # fmt: skip
    wl = Workload(name="t", seed=0, applications=(Application("x", 0.0, nodes),))
    [(app, arrival)] = workload_apps(wl)
    assert arrival == 0.0 and app.system_prompt == "Task.\n"
    assert list(app.agents) == ["a", "b", "review"]
    assert app.preds == {"a": [], "b": [], "review": ["a", "b"]}


def test_sim_tool_calling_clients_send_no_hints_and_no_events():
    """``policy@tool-calling``: no metadata, no events; every tool call is inferred (started
    by the response, ended by the successor's request) and the outputs stay identical."""
    from bench.run import split_policy

    assert split_policy("tokencake@tool-calling") == ("tokencake", "tool-calling")
    assert split_policy("vllm") == ("vllm", None)
    with pytest.raises(SystemExit, match="unknown client"):
        split_policy("tokencake@psychic")
    wl, preset = tiny_workload(), tiny_preset()
    _, annotated, _ = run_sim(wl, "tokencake", preset, seed=3)
    m, inferred, _ = run_sim(wl, "tokencake", preset, seed=3, client="tool-calling")
    assert annotated.events and not inferred.events  # events: annotated only
    assert m["calls"] == wl.num_llm_calls and inferred.outputs == annotated.outputs
    assert all(not math.isnan(a.finished_s) for a in inferred.apps)


def test_sim_first_application_carries_its_start_time(monkeypatch):
    """0 in ``application_started_at_s`` means "not given"; the simulated clock must not read
    0 when the first application starts, or that application loses its program-level rank."""
    from bench.driver import SimBackend

    seen: dict[str, float] = {}
    submit = SimBackend.submit

    def spy(self, rid, prompt, max_tokens, metadata):
        if isinstance(metadata, dict):
            seen[rid] = metadata["application_started_at_s"]
        submit(self, rid, prompt, max_tokens, metadata)

    monkeypatch.setattr(SimBackend, "submit", spy)
    wl = tiny_workload()
    run_sim(wl, "continuum", tiny_preset(), seed=3)
    first = min(wl.applications, key=lambda a: a.arrival_s).app_id
    assert any(rid.startswith(f"{first}/") for rid in seen)
    assert all(start > 0 for start in seen.values()), seen


def test_engine_variants_name_runner_options():
    from tokencake.runner_config import RunnerConfig

    opts = runner_options("switch+nofuse+bf16")
    assert opts == {"layer_loop": "switch", "fuse_projections": False, "weight_dtype": "bfloat16"}
    RunnerConfig(num_pages=4, **opts)
    for suffix in SUFFIXES:  # every suffix names real RunnerConfig fields
        RunnerConfig(num_pages=4, **runner_options(f"scan+{suffix}"))
    with pytest.raises(ValueError, match=r"\+fast"):
        runner_options("switch+fast")
