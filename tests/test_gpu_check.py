"""bench/gpu_check.py is the one script run when a GPU is lent: these tests keep it runnable
on the CPU (its ``--cpu-smoke`` mode: tiny shapes, Pallas in interpret mode, the tiny model)."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check


def test_roofline_section_measures_decode_and_its_roofline(tmp_path):
    out = gpu_check.roofline(["reference"], str(tmp_path / "absent"), "float32", smoke=True)
    assert out["read_gbps"] > 0
    assert "skipped" in out["model_1b"]  # no checkpoint there: said so, not silently dropped
    (model,) = out["models"]
    res = model["backends"]["reference"]
    assert "error" not in res, res
    assert res["B=1"] > 0 and res["B=2"] > 0
    # the share of the roofline is the measured rate over read bandwidth / bytes per step
    roof = out["read_gbps"] * 1e9 / model["bytes_per_b1_step"]
    assert res["b1_of_roofline"] == pytest.approx(res["B=1"] / roof, rel=0.02)


@pytest.mark.slow  # ~1-2 minutes on 2 cores: every section, Pallas interpreted
def test_cpu_smoke_writes_every_section(tmp_path):
    report = tmp_path / "gpu.json"
    assert gpu_check.main(["--cpu-smoke", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["ok"] and not data["errors"]
    for section in ("correctness", "speed", "roofline", "transfers"):
        assert section in data, section
    split = data["transfers"]["copy_out_split"]
    assert split["engine_vs_raw"] > 0 and split["gbps"]["numpy_memcpy"] > 0


def test_stall_free_room_reports_the_profile(make_engine):
    out = gpu_check.stall_free_room(make_engine().runner)
    assert out["step_floor_ms"] > 0 and out["prefill_b_us"] >= 0
    rooms = out["room_tokens"]
    assert set(rooms) == {"rows=1", "rows=8", "rows=32"}
    assert rooms["rows=1"] >= rooms["rows=8"] >= rooms["rows=32"] >= 0  # rows take room
