"""The per-step passes over whole queues that issue 17 item 4 rewrote for speed decide what
their plain definitions decide, on random request states:

* the Space Scheduler's uncommitted capacity (numpy columns over the running set) against
  ``free - sum(remaining_growth(r))``, with and without full-future admission;
* the Time Scheduler's ranking of queued requests' prefixes (a set probe skips the ranked
  ones) against a loop over the queue;
* the in-flight prefix hashes (``is_prefill`` inlined) against the property, and the
  policy's kept set of possibly prefilling requests against a pass over the running set, at
  every step of a simulated run with chunked prefills, shared prefixes, preemptions and aborts.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.core import Scheduler, SchedulerConfig
from tokencake.scheduler.lifecycle import Lifecycle
from tokencake.scheduler.request import Request
from tokencake.scheduler.sharing import inflight_hashes
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step
from tokencake.scheduler.space import SpaceScheduler
from tokencake.scheduler.time_sched import TimeScheduler
from tokencake.scheduler.tokencake_config import SpaceConfig, TimeConfig
from tokencake.scheduler.waiting_queue import WaitingQueue

BS = 16


def _random_request(rng: random.Random, i: int) -> Request:
    """A request at a random point of its life: prompt, output so far, computed tokens and
    blocks that cover anything from less to more than its tokens."""
    prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 90))]
    r = Request(f"r{i}", prompt, rng.randrange(1, 200), float(rng.randrange(0, 5)))
    r.output_token_ids = [rng.randrange(1, 50) for _ in range(rng.randrange(0, 60))]
    r.num_computed_tokens = rng.randrange(0, r.num_tokens + 1)
    r.block_ids = list(range(max(0, -(-r.num_tokens // BS) + rng.randrange(-3, 2))))
    return r


@pytest.mark.parametrize("reserve", [False, True])
def test_uncommitted_capacity_is_free_minus_every_running_growth(reserve):
    rng = random.Random(7 + reserve)
    cfg = dataclasses.replace(SpaceConfig(), reserve_generation_tokens=reserve)
    pool = BlockPool(4096, BS)
    pool.allocate(rng.randrange(0, 2000))
    for trial in range(40):
        sp = SpaceScheduler(cfg, pool, max_model_len=rng.choice([64, 128, 4096]))
        running = [_random_request(rng, i) for i in range(rng.randrange(0, 60))]
        extra = rng.randrange(0, 50)
        sp.refresh_uncommitted(running, extra)
        expected = pool.num_free - sum(sp.remaining_growth(r) for r in running) - extra
        assert sp.uncommitted == expected, trial
        sp.recount(extra + 3)  # the post-tick recount reuses the growth
        assert sp.uncommitted == expected - 3


def _rank_reference(waiting: list[Request], budget: int = 16) -> list[str]:
    """The requests ``_rank_queued`` ranks, by the plain loop: unranked ones in queue order,
    at most ``budget``."""
    return [r.request_id for r in waiting if not r.reuse_ranked][:budget]


@pytest.mark.parametrize("logged", [False, True])
@pytest.mark.parametrize("forget", [True, False])
def test_queued_requests_are_ranked_in_queue_order_up_to_the_budget(forget, logged, monkeypatch):
    """Ranked in queue order (the order of the pool calls, which the eviction ranks follow),
    also for requests that leave and come back (requeued), requests ranked before the Time
    Scheduler saw them, and with or without ``forget`` for finished ones (without it, the
    set of ranked requests is rebuilt from the queue once it grows large). ``logged``: the
    core's queue, whose log names the newcomers after a pass that saw every request (and
    an occasional unlogged change, after which the pass reads the whole queue)."""
    rng = random.Random(3 + forget + 2 * logged)
    pool = BlockPool(512, BS)
    ts = TimeScheduler(TimeConfig(), pool, Lifecycle(lambda: 0.0), CopyTracker(pool, None))
    calls: list[float] = []
    real = pool.expect_reuse
    monkeypatch.setattr(pool, "expect_reuse", lambda b, t: calls.append(t) or real(b, t))
    waiting: list[Request] = WaitingQueue() if logged else []
    away: list[Request] = []
    n = 0
    for step in range(300):
        for _ in range(rng.choice([0, 0, 1, 3, 25, 60])):
            r = _random_request(rng, n)
            r.arrival_time = float(n)  # names the request in ``calls``
            r.reuse_ranked = rng.random() < 0.05  # ranked by someone else
            waiting.append(r)
            n += 1
        for _ in range(rng.randrange(0, 30)):
            if waiting:
                r = waiting[rng.randrange(len(waiting))]
                if logged and rng.random() < 0.97:
                    waiting.remove(r)
                else:
                    waiting.pop(waiting.index(r))  # unlogged on a logged queue
                if rng.random() < 0.3:
                    away.append(r)  # admitted, to be preempted
                elif forget:
                    ts.forget(r)  # finished
        for _ in range(rng.choice([0, 0, 2])):
            if away:
                waiting.append(away.pop(rng.randrange(len(away))))  # requeued at the end
        expected = _rank_reference(waiting)
        by_time = {r.arrival_time: r.request_id for r in waiting}
        calls.clear()
        ts._rank_queued(waiting)
        assert [by_time[t] for t in calls] == expected, step
    # without forget() the set was rebuilt: it holds no more than the bound allows
    assert n > 3000 and len(waiting) < n - 1024 and len(ts._ranked) <= 2 * len(waiting) + 1024


def test_inflight_hashes_are_the_prefilling_requests_uncomputed_blocks():
    rng = random.Random(11)
    for trial in range(30):
        running = [_random_request(rng, i) for i in range(rng.randrange(0, 40))]
        expected: set[bytes] = set()
        for r in running:
            if r.is_prefill:
                expected.update(r.block_hashes(BS)[r.num_computed_tokens // BS :])
        assert inflight_hashes(running, BS) == expected, trial


@pytest.mark.parametrize("policy", ["tokencake", "tokencake-space"])
def test_kept_prefills_give_the_inflight_hashes_of_the_running_set(policy):
    """The policy's in-flight hashes come from the requests admitted mid-prompt (``Prefills``);
    at every step they equal ``inflight_hashes`` over the whole running set."""
    rng = random.Random(5)
    clock = SimClock()
    pool = BlockPool(160, BS)  # small: growth preempts
    cfg = SchedulerConfig(max_num_seqs=24, max_num_batched_tokens=256, max_prefill_chunk=32,
                          max_prefill_seqs=6, max_model_len=512)  # fmt: skip
    s = Scheduler(cfg, pool, policy, clock)
    ex = SimExecutor(clock)
    pol = s.policy
    checked = []
    on_step = pol.on_step

    def checked_on_step(now, running, waiting):
        on_step(now, running, waiting)
        assert pol._inflight == inflight_hashes(running, BS), len(checked)
        checked.append(sum(r.is_prefill for r in running))

    pol.on_step = checked_on_step
    parents = [[rng.randrange(1, 500) for _ in range(rng.randrange(40, 160))] for _ in range(6)]
    n = 0
    for _ in range(400):
        for _ in range(rng.choice([0, 0, 1, 3])):  # fan-outs: siblings share a parent's prefix
            prompt = rng.choice(parents) + [
                rng.randrange(1, 500) for _ in range(rng.randrange(1, 40))
            ]
            s.add_request(Request(f"q{n}", prompt, rng.randrange(2, 200), clock()))
            n += 1
        if s.running and rng.random() < 0.05:
            s.abort(rng.choice(s.running).request_id)
        sim_step(s, ex)
    assert len(checked) == 400 and max(checked) >= 2  # prefills ran side by side
    assert pol.sharing_deferrals > 0 and s.num_preemptions > 0
