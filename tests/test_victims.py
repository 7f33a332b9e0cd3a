"""Victim choice by restore time (``scheduling.victim_by_restore_time``, issue 12 sixth round),
checked by hand against the native recompute-per-freed-block rule."""

from __future__ import annotations

import pytest

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.scheduler.ablations import ablation_config
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.request import Request
from tokencake.scheduler.space import SpaceScheduler
from tokencake.scheduler.tokencake_config import SpaceConfig
from tokencake.scheduler.victims import restore_seconds

BS = 16
# 1 ms per block copied (1,000 bytes at 1 MB/s, plus the model's 3 us submission cost per
# block), 1 ms per token recomputed, no fixed or context terms: every figure below is by hand.
COST = CostModel.fixed(1000, 1e6, 0.0, (0.0, 1e-3, 0.0))
PER_BLOCK = 1e-3 + 3e-6


def _running(pool: BlockPool, rid: str, blocks: int, computed: int) -> Request:
    r = Request(rid, [1] * computed, 100, 0.0, metadata=AgentMetadata())
    r.block_ids = pool.allocate(blocks)
    r.num_computed_tokens = computed
    return r


@pytest.fixture
def three() -> tuple[SpaceScheduler, list[Request], dict[str, int]]:
    pool = BlockPool(64, BS)
    sp = SpaceScheduler(SpaceConfig(), pool, 4096)
    # "long": a 40-block session whose whole context the host holds (nothing to recompute,
    # 40 blocks to copy in); "short": 4 blocks, 3 of them on the host, 16 tokens to recompute.
    long = _running(pool, "long", 40, 640)
    short = _running(pool, "short", 4, 64)
    needy = _running(pool, "needy", 1, 16)
    rs = [long, short, needy]
    sp.begin_step(0.0, rs, [], 0)
    return sp, rs, {"long": 640, "short": 48, "needy": 0}


def test_restore_seconds_by_hand(three: tuple) -> None:
    _, rs, restorable = three
    t = restore_seconds(rs, restorable, COST, BS)
    assert t["long"] == pytest.approx(40 * PER_BLOCK)  # 40 blocks copied, 0 recomputed
    assert t["short"] == pytest.approx(3 * PER_BLOCK + 16e-3)  # 3 copied + 16 tokens
    assert t["needy"] == pytest.approx(16e-3)  # nothing on the host: all recomputed


def test_cheapest_sufficient_restore_is_the_victim(three: tuple) -> None:
    sp, rs, restorable = three
    long, short, needy = rs
    # Native rule: "long" recomputes nothing per freed block (0 < 16/4), so it is preempted,
    # though bringing it back costs 40.1 ms against "short"'s 19.0 ms.
    assert sp.victim(rs, needy, 2, 0.0, restorable) is long
    t = restore_seconds(rs, restorable, COST, BS)
    assert sp.victim(rs, needy, 2, 0.0, restorable, t) is short  # both free >= 2 blocks
    # No candidate frees 10 blocks but "long": only it is sufficient, so it goes.
    assert sp.victim(rs, needy, 10, 0.0, restorable, t) is long
    # Nobody alone frees 50: the cheapest restore per freed block (long 1.0 ms, short 4.75).
    assert sp.victim(rs, needy, 50, 0.0, restorable, t) is long


def test_the_ablation_switches_it_on() -> None:
    assert not SpaceConfig().victim_by_restore_time  # off by default (lost on deep-research)
    cfg = ablation_config("with-restore-time-victims")
    assert cfg.scheduling.victim_by_restore_time
