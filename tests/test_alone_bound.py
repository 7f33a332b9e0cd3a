"""bench/alone_bound.py: no policy's total E2E is under the bound, and one application alone
meets it exactly."""

from __future__ import annotations

import dataclasses

import pytest

from bench.alone_bound import alone_bound, main
from bench.generators import multi_turn
from bench.presets import make_preset
from bench.run import run_sim


def test_shared_runs_finish_no_earlier_than_the_bound():
    preset = make_preset("a800-qwen2.5-14b")
    wl = multi_turn(num_apps=3, arrival_rate=1.0, seed=1, poisson=False, mean_turns=4)
    bound, app = alone_bound(wl, "tokencake", preset)
    assert app in {a.app_id for a in wl.applications}
    for policy in ("vllm", "tokencake"):
        m, _, _ = run_sim(wl, policy, preset)
        assert m["total_e2e_s"] >= bound - 1e-6, policy
    one = dataclasses.replace(wl, applications=[wl.applications[1]])
    m, _, _ = run_sim(one, "tokencake", preset)
    assert alone_bound(one, "tokencake", preset)[0] == pytest.approx(m["total_e2e_s"])


def test_cli_prints_a_bound_per_cell(capsys):
    main(["--apps", "2", "--rates", "1.0", "--seeds", "0"])
    assert "multi-turn rate 1.0 seed 0: bound " in capsys.readouterr().out
