"""bench/seed_sweep.py: seed parsing, the ratio against the best baseline, and one real sweep."""

from __future__ import annotations

import json

import pytest

from bench import seed_sweep


def test_parse_seeds():
    assert seed_sweep.parse_seeds("2-5") == [2, 3, 4, 5]
    assert seed_sweep.parse_seeds("1,4-5,9") == [1, 4, 5, 9]
    with pytest.raises(ValueError):
        seed_sweep.parse_seeds("x")


def test_ratio_is_against_the_fastest_baseline_of_the_same_cell():
    def row(w, s, p, e2e):
        return {"workload": w, "rate": 1.0, "seed": s, "policy": p, "total_e2e_s": e2e}

    rows = [row("multi-turn", 2, "vllm", 200.0), row("multi-turn", 2, "continuum", 160.0),
            row("multi-turn", 2, "tokencake", 144.0), row("multi-turn", 3, "vllm", 100.0),
            row("multi-turn", 3, "tokencake", 99.0)]  # fmt: skip
    assert seed_sweep.ratios(rows, "tokencake") == {
        ("multi-turn", 1.0, 2): pytest.approx(0.9),
        ("multi-turn", 1.0, 3): pytest.approx(0.99),
    }
    table = seed_sweep.summary_lines(rows, ["tokencake"])
    assert table[2] == "| tokencake | multi-turn | 1.0 | 2 | 0.945 | 0.990 | 1 / 2 |"


def test_a_small_sweep_runs_every_baseline(tmp_path, capsys):
    seed_sweep.main(["--seeds", "0", "--apps", "2", "--workloads", "deep-research",
                     "--rates", "1.0", "--jobs", "1", "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted(r["policy"] for r in rows) == sorted([*seed_sweep.BASELINES, "tokencake"])
    assert all(r["total_e2e_s"] > 0 and r["apps"] == 2 for r in rows)
    assert "| tokencake | deep-research | 1.0 | 1 |" in capsys.readouterr().out


def test_tool_noise_jitters_the_true_durations_around_the_clients_estimate():
    from bench.driver import Driver
    from bench.presets import make_preset

    preset = make_preset("h100-llama3.1-8b")
    quiet = seed_sweep.cell_workload("code-writer", 1.0, 4, 3, preset, True)
    noisy = seed_sweep.cell_workload("code-writer", 1.0, 4, 3, preset, True, tool_noise=0.5)
    apps = zip(quiet.applications, noisy.applications, strict=True)
    pairs = [(a, n, b.node(n.id)) for a, b in apps for n in a.nodes if n.tool is not None]
    assert pairs
    for app, q, n in pairs:
        assert n.tool.duration_noise == 0.5 and n.tool.estimate_s == q.tool.estimate_s
        assert Driver.tool_duration_of(4, app.app_id, q) == q.tool.true_duration_s
    moved = [Driver.tool_duration_of(4, app.app_id, n) / q.tool.true_duration_s
             for app, q, n in pairs]  # fmt: skip
    assert len(set(moved)) > 1 and all(m >= 0 for m in moved)


def test_floor_lines_give_each_group_its_room_over_the_no_pressure_floor():
    def row(s, p, e2e):
        return {"workload": "deep-research", "rate": 1.0, "seed": s, "policy": p,
                "total_e2e_s": e2e}  # fmt: skip

    rows = [row(1, "vllm", 120.0), row(1, "continuum", 110.0), row(1, "tokencake", 99.0),
            row(1, seed_sweep.FLOOR, 100.0), row(2, "vllm", 90.0), row(2, "tokencake", 81.0),
            row(2, seed_sweep.FLOOR, 90.0), row(3, "vllm", 50.0), row(3, "tokencake", 40.0)]  # fmt: skip
    lines = seed_sweep.floor_lines(rows, ["tokencake"])
    # seed 3 has no floor row and is left out; medians of (1.10, 1.00) and (0.99, 0.90)
    assert lines[2] == "| deep-research | 1.0 | 2 | 1.050 | 0.945 |"


def test_a_sweep_with_the_floor_runs_it_once_per_cell(tmp_path, capsys):
    seed_sweep.main(["--seeds", "0", "--apps", "2", "--workloads", "deep-research", "--floor",
                     "--rates", "1.0", "--jobs", "1", "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    floor = [r for r in rows if r["policy"] == seed_sweep.FLOOR]
    assert len(floor) == 1 and floor[0]["kv_capacity_blocks"] == 10 * next(
        r["kv_capacity_blocks"] for r in rows if r["policy"] == "vllm"
    )
    assert "| deep-research | 1.0 | 1 |" in capsys.readouterr().out.split("x floor")[-1]


def test_shape_flags_reshape_every_application_of_the_sweep(tmp_path):
    from bench.presets import make_preset

    def totals(wl):
        nodes = [n for app in wl.applications for n in app.nodes]
        return (sum(n.prompt_tokens or 0 for n in nodes), sum(n.max_tokens for n in nodes),
                sum(n.tool.true_duration_s for n in nodes if n.tool is not None))  # fmt: skip

    preset = make_preset("a800-qwen2.5-14b")
    plain = totals(seed_sweep.cell_workload("deep-research", 1.0, 3, 2, preset, True))
    shaped = totals(seed_sweep.cell_workload("deep-research", 1.0, 3, 2, preset, True,
                                             context_scale=2.0, output_scale=0.5,
                                             tool_time_scale=3.0))  # fmt: skip
    # the same draws, each prompt doubled and each answer halved (rounded per node)
    assert abs(shaped[0] / plain[0] - 2.0) < 0.01 and abs(shaped[1] / plain[1] - 0.5) < 0.02
    assert shaped[2] == pytest.approx(3.0 * plain[2])
    with pytest.raises(ValueError, match="unknown shaping parameters"):
        seed_sweep.cell_workload("multi-turn", 1.0, 0, 2, preset, True, num_turns=3)

    seed_sweep.main(["--seeds", "0", "--apps", "2", "--workloads", "deep-research",
                     "--rates", "1.0", "--jobs", "1", "--context-scale", "2",
                     "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    base = seed_sweep.run_cell(("deep-research", 1.0, 0, 2, "vllm", "a800-qwen2.5-14b", False, ()))
    assert next(r for r in rows if r["policy"] == "vllm")["input_tokens"] > base["input_tokens"]
