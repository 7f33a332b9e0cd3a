"""Tensor parallelism on simulated CPU devices: greedy tokens equal the single-device run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.device_subprocess import run_device_check

SCRIPT = Path(__file__).parent / "helpers" / "tp_check.py"


def run_check(n: int, which: str, sizes: str | None = None, *extra: str) -> dict:
    return run_device_check(SCRIPT, n, which, *([sizes] if sizes else []), *extra, timeout=900)


def test_tiny_model_tp_matches_single_device():
    # One process with four devices runs TP 1, 2 and 4 (one reference for both).
    res = run_check(4, "tiny", "1,2,4")
    for n in ("2", "4"):
        assert res["1"]["tokens"] == res[n]["tokens"], n
        assert "'tp'" in res[n]["k_sharding"]


def test_bfloat16_weights_shard_too():
    # weight_dtype="bfloat16" under tensor parallelism: the sharded bfloat16 matrices (kept
    # [in, out] and unfused there) give the single device's tokens.
    res = run_check(2, "tiny", "1,2", "bfloat16")
    assert res["1"]["tokens"] == res["2"]["tokens"]
    assert res["2"]["weight_dtype"] == "bfloat16" and "'tp'" in res["2"]["k_sharding"]


def test_indivisible_heads_are_refused():
    res = run_check(3, "tiny", "3")  # the tiny model has 8 query / 4 KV heads
    assert "does not divide" in res["3"]["error"]


@pytest.mark.slow
def test_default_model_tp3_matches_single_device():
    res = run_check(3, "default")  # SmolLM2: 9 query, 3 KV heads, MLP 1536
    assert res["1"]["tokens"] == res["3"]["tokens"]
