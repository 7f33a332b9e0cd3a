"""Fan-out siblings share one computation of their common prefix (scheduler/sharing.py)."""

from __future__ import annotations

import pytest

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.core import Scheduler, SchedulerConfig
from tokencake.scheduler.request import Request
from tokencake.scheduler.sharing import inflight_hashes, waits_for_inflight
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step

PREFIX = [100 + i for i in range(64)]  # 4 full blocks of 16, cached nowhere


def _sibling(i: int) -> Request:
    md = {"agent_type": "programmer", "importance": 1.0, "depth": 2, "join_group": "j",
          "application_started_at_s": 1.0}  # fmt: skip
    return Request(f"s{i}", PREFIX + [900 + 10 * i + k for k in range(8)], 4, 0.0, metadata=md)


def test_waits_for_a_block_a_running_prefill_computes():
    a, b = _sibling(0), _sibling(1)
    inflight = inflight_hashes([a], 16)
    assert len(inflight) == 4  # a's 72 tokens: 4 full blocks, none computed yet
    assert waits_for_inflight(b, inflight, 16)  # b's first block is a's first block
    a.num_computed_tokens = 64  # a has computed the shared prefix: nothing left to wait for
    assert not waits_for_inflight(b, inflight_hashes([a], 16), 16)
    b.block_ids = [1, 2, 3, 4]  # b hit those 4 blocks; its next block is its own
    assert not waits_for_inflight(b, inflight, 16)


@pytest.mark.parametrize("policy, prefix_computations", [("vllm", 3), ("tokencake", 1)])
def test_siblings_compute_their_shared_prefix_once(policy, prefix_computations):
    """Three siblings arrive together with an uncached 64-token prefix. vllm admits all three
    in one step and computes the prefix three times; tokencake admits one, defers the others
    until its prefill has registered the blocks, and they hit them."""
    clock = SimClock()
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_prefill_chunk=256,
                          max_prefill_seqs=4, max_model_len=256)  # fmt: skip
    s = Scheduler(cfg, BlockPool(64, 16), policy, clock)
    ex = SimExecutor(clock)
    sibs = [_sibling(i) for i in range(3)]
    for r in sibs:
        s.add_request(r)
    executed = 0
    outputs = {}
    while s.has_work:
        plan, done = sim_step(s, ex)
        executed += plan.num_tokens
        outputs.update({r.request_id: r.output_token_ids for r in done})
    # 8 own tokens each + 3 decode steps each (4 outputs, the last never computed)
    assert executed == 64 * prefix_computations + 3 * 8 + 3 * 3
    assert len(outputs) == 3
