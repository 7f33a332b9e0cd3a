"""Successor hand-off (scheduler/handoff.py): a finished agent's cached context goes to the
request that extends it."""

from __future__ import annotations

import pytest

from tests.helpers.sim_steps import start_steps
from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.core import Scheduler, SchedulerConfig
from tokencake.scheduler.handoff import HandOff
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step
from tokencake.scheduler.tokencake_config import TokencakeConfig

MID = dict(agent_type="coder", application_max_depth=3, depth=1, out_degree=1)  # not a leaf
LEAF = dict(agent_type="writer", application_max_depth=3, depth=3, out_degree=0)


def _req(rid: str, tokens: list[int], arrival: float, md: dict | None = MID) -> Request:
    """A request carrying validated metadata (what the scheduler's ``add_request`` makes)."""
    return Request(rid, tokens, 4, arrival,
                   metadata=None if md is None else AgentMetadata.from_dict(md))  # fmt: skip


def _finished(pool: BlockPool, tokens: list[int]) -> Request:
    """A request whose ``tokens`` were all computed into hashed blocks, then released."""
    r = _req("P", tokens, 0.0)
    r.block_ids = pool.allocate(-(-len(tokens) // pool.block_size))
    for b, h in zip(r.block_ids, r.block_hashes(pool.block_size), strict=False):
        pool.register(b, h)
    r.num_computed_tokens = len(tokens)
    pool.free(r.block_ids)
    r.status = RequestStatus.FINISHED_STOPPED
    return r


def test_successors_by_hand():
    """Block size 4; P computed 12 tokens (3 full blocks, tail = block 2) and finished at
    t=10. S extends P's 12 tokens; O does not; L extends P but is a DAG leaf; R extends P but
    was preempted (it resumes its own context)."""
    pool = BlockPool(9, 4)
    p_tokens = list(range(100, 112))
    ho = HandOff(pool, grace_s=5.0)
    ho.on_finished(_finished(pool, p_tokens), 10.0)
    s = _req("S", p_tokens + [7, 8, 9], 10.0, MID)
    o = _req("O", list(range(500, 515)), 10.0, MID)
    leaf = _req("L", p_tokens + [1], 10.0, LEAF)
    r = _req("R", p_tokens + [5], 10.0, MID)
    r.num_preemptions = 1
    early = _req("E", p_tokens + [6], 9.0, MID)  # queued before P finished
    queue = [o, leaf, r, early, s]
    assert ho.successors(queue, 10.0) == [s]
    assert ho.successors(queue, 15.0) == [s]  # grace 5 s: still on at exactly 15
    assert ho.successors(queue, 15.1) == []  # past the grace: forgotten
    # Evicted tail: nothing to hand over.
    ho.on_finished(_finished(BlockPool(9, 4), p_tokens), 20.0)  # (another pool: not resident)
    assert ho.successors([s], 20.0) == []
    ho2 = HandOff(pool, grace_s=5.0)
    ho2.on_finished(_finished(pool, p_tokens), 30.0)
    s2 = _req("S2", p_tokens + [7], 30.0, MID)
    assert ho2.successors([s2], 30.0) == [s2]
    pool.evict_cached()
    assert ho2.successors([s2], 30.0) == []


def test_a_leaf_hands_nothing_on_and_an_abort_neither():
    pool = BlockPool(9, 4)
    p_tokens = list(range(100, 112))
    ho = HandOff(pool, grace_s=5.0)
    p = _finished(pool, p_tokens)
    p.metadata = AgentMetadata.from_dict(LEAF)
    ho.on_finished(p, 0.0)
    q = _finished(BlockPool(9, 4), p_tokens)
    q.status = RequestStatus.FINISHED_ABORTED
    ho.on_finished(q, 0.0)
    assert ho.successors([_req("S", p_tokens + [1], 0.0, MID)], 0.0) == []


def test_promote_keeps_the_ordinary_request_barrier():
    pool = BlockPool(9, 4)
    p_tokens = list(range(100, 112))
    ho = HandOff(pool, grace_s=5.0)
    ho.on_finished(_finished(pool, p_tokens), 0.0)
    a = _req("A", list(range(600, 610)), 0.0, MID)
    s = _req("S", p_tokens + [1], 0.0, MID)
    plain = _req("N", list(range(700, 710)), 0.0, None)
    s_late = _req("T", p_tokens + [2], 0.0, MID)
    order = [a, s, plain, s_late]
    assert ho.promote(order, order, 0.0) == [s, a, plain, s_late]
    assert ho.promoted == 1


def _run(policy: str) -> tuple[dict[str, int], dict[str, list[int]], int]:
    """12 usable blocks of 16 tokens. P (96-token prompt, 4 outputs) runs; O (160 tokens =
    10 blocks, importance 5: it outranks S) waits, 5 blocks short. When P finishes, S is
    submitted with P's 100 tokens plus 16 of its own (8 blocks, 6 of them P's cached ones).
    Returns the step each request first ran, the outputs, and S's cached tokens."""
    clock = SimClock()
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_prefill_chunk=256,
                          max_prefill_seqs=4, max_model_len=256)  # fmt: skip
    pool = BlockPool(13, 16)
    s = Scheduler(cfg, pool, policy, clock)
    ex = SimExecutor(clock)
    p = _req("P", list(range(100, 196)), 0.0, MID)
    s.add_request(p)
    sim_step(s, ex)
    o = Request("O", list(range(1000, 1160)), 4, clock(), metadata={**MID, "importance": 5.0})
    s.add_request(o)
    reqs = {"p": p, "o": o}
    started = {"p": 1}

    def submit_successor(step: int) -> None:  # S arrives once P has finished
        if p.status.finished and "s" not in reqs:
            reqs["s"] = Request("S", p.all_token_ids[:100] + list(range(3000, 3016)), 4,
                                clock(), metadata=MID)  # fmt: skip
            s.add_request(reqs["s"])
            started["p_finished"] = step

    # P's own start and its finish step are set here; start_steps adds the others.
    started = {**start_steps(s, ex, reqs, 1, 200, submit_successor), **started}
    pool.check_integrity()
    outputs = {k: list(r.output_token_ids) for k, r in reqs.items()}
    return started, outputs, reqs["s"].num_cached_tokens


def test_the_successor_takes_its_predecessors_blocks_before_an_older_request():
    """By hand: after P's finish its 6 hashed blocks are cached and all 12 blocks are free.
    By score O goes first and takes 10 of them (evicting most of P's context); S then needs
    8 and waits for O, and recomputes what was evicted. With the hand-off S goes first: 2 new
    blocks + 6 revived = 8 <= 12, its 96 cached tokens hit; O (10 > 4 left) waits for S."""
    base, out_base, cached_base = _run("tokencake")
    ho, out_ho, cached_ho = _run("tokencake-with-successor-handoff")
    assert out_base == out_ho  # hints change when tokens are computed, never which
    assert base["p_finished"] == ho["p_finished"]
    assert base["o"] < base["s"]  # without: O first, S after it
    assert cached_base < 96
    assert ho["s"] == ho["p_finished"] + 1  # with: S the very next step ...
    assert ho["o"] > ho["s"]  # ... and O after it
    assert cached_ho == 96  # P's whole context (6 blocks) handed over


def test_bad_grace_is_an_error_naming_the_knob():
    with pytest.raises(ValueError, match="successor_handoff_s"):
        TokencakeConfig.from_dict({"scheduling": {"successor_handoff_s": -1.0}})
    with pytest.raises(ValueError, match="grace_s"):
        HandOff(BlockPool(9, 4), grace_s=0.0)
    assert TokencakeConfig().scheduling.successor_handoff_s == 0.0  # off by default
