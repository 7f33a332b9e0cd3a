"""Tensor parallelism on simulated CPU devices: greedy tokens equal the single-device run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.device_subprocess import run_device_check

SCRIPT = Path(__file__).parent / "helpers" / "tp_check.py"


def run_check(n: int, which: str) -> dict:
    return run_device_check(SCRIPT, n, which, timeout=900)


@pytest.mark.parametrize("n", [2, 4])
def test_tiny_model_tp_matches_single_device(n):
    res = run_check(n, "tiny")
    assert res["1"]["tokens"] == res[str(n)]["tokens"]
    assert "'tp'" in res[str(n)]["k_sharding"]


def test_indivisible_heads_are_refused():
    res = run_check(3, "tiny")  # the tiny model has 8 query / 4 KV heads
    assert "does not divide" in res["3"]["error"]


@pytest.mark.slow
def test_default_model_tp3_matches_single_device():
    res = run_check(3, "default")  # SmolLM2: 9 query, 3 KV heads, MLP 1536
    assert res["1"]["tokens"] == res["3"]["tokens"]
