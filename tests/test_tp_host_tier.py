"""The host KV tier under tensor parallelism (issue 18), on simulated CPU devices.

The device cache is sharded on its KV-head axis; the host tier is sharded the same way, so each
device's heads have a host copy beside it and a page copy is one independent copy per device.
The checks run in a subprocess (the device count is fixed before JAX starts):
tests/helpers/tp_host_check.py. Independent references: the host tier's bytes against the
device pages they came from, and greedy tokens against a TP=1 run with no host tier and no
memory pressure (nothing offloaded, swapped or hit).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.device_subprocess import run_device_check

SCRIPT = Path(__file__).parent / "helpers" / "tp_host_check.py"


def run_check(n: int, *parts: str) -> dict:
    return run_device_check(SCRIPT, n, *parts, timeout=1500)


def check_transfer(res: dict, n: int) -> None:
    for tier in ("pinned", "numpy"):
        t = res[tier]
        assert t["ok"] and t["num_shards"] == n, t
        assert t["host_exact"], f"{tier}: host copies differ from the device pages"
        assert t["round_trip_exact"] and t["rest_untouched"], t
        assert t["placement"], f"{tier}: a host shard is not beside its device's KV heads"
        assert t["device_sharding_kept"], t
        assert t["collectives"] == [], f"{tier}: copies communicate across devices: {t}"
        assert t["bandwidth_samples"] == {"d2h": 1, "h2d": 1}
    assert res["pinned"]["memory_kind"] == "pinned_host" and res["numpy"]["memory_kind"] is None
    assert "host KV tier is laid out for" in res["mismatch"]


def check_time(res: dict, n: int) -> None:
    assert f"'tp': {n}" in res["kv_sharding"]
    assert res["offloads"] == 1 and res["uploads"] == 1 and res["state_at_return"] == "restored"
    assert res["blocks"] == 6 and res["device_hits_after_poison"] == 0 and res["poisoned_pages"]
    # bit-exact: device pages -> host shards -> (poisoned) device pages
    assert res["before"] == res["on_host"] == res["after"]
    assert res["a2_cached_tokens"] == 6 * 16  # the successor hit the uploaded prefix
    assert res["tokens"] == res["reference"]


def check_hits(res: dict, n: int) -> None:
    assert res["tokens"] == [res["reference"]] * 3  # cold, device hits, host hits
    assert res["h2d_copies"] > 0 and res["failed"] == 0
    assert res["host_shards"] == res["cost_model_shards"] == n


def check_swap(res: dict, n: int) -> None:
    assert res["tokens"] == res["reference"]
    assert res["swap_outs"] > 0 and res["failed"] == 0


def test_tp2_round_trips_are_bit_exact_and_outputs_unchanged():
    """TP=2: copies per shard with no collective (pinned and numpy tiers); the Time
    Scheduler's offload -> predictive upload is bit-exact and greedy tokens match TP=1."""
    res = run_check(2, "transfer", "time")
    check_transfer(res["transfer"], 2)
    check_time(res["time"], 2)


@pytest.mark.slow  # two more TP engines (host prefix hits, swap): about 2 CPU-minutes
def test_tp2_host_hits_and_swap_match_tp1_without_host_tier():
    res = run_check(2, "hits", "swap")
    check_hits(res["hits"], 2)
    check_swap(res["swap"], 2)


@pytest.mark.slow  # four TP=4 engines and their compiles: about 4 CPU-minutes
def test_tp4_host_tier():
    res = run_check(4)
    check_transfer(res["transfer"], 4)
    check_time(res["time"], 4)
    check_hits(res["hits"], 4)
    check_swap(res["swap"], 4)
