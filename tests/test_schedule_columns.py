"""The per-step passes over whole queues that issue 17 item 4 rewrote for speed decide what
their plain definitions decide, on random request states:

* the Space Scheduler's uncommitted capacity (numpy columns over the running set) against
  ``free - sum(remaining_growth(r))``, with and without full-future admission;
* the Time Scheduler's ranking of queued requests' prefixes (a C-level skip of the ranked
  ones) against a loop over the queue;
* the in-flight prefix hashes (``is_prefill`` inlined) against the property.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.lifecycle import Lifecycle
from tokencake.scheduler.request import Request
from tokencake.scheduler.sharing import inflight_hashes
from tokencake.scheduler.space import SpaceScheduler
from tokencake.scheduler.time_sched import TimeScheduler
from tokencake.scheduler.tokencake_config import SpaceConfig, TimeConfig

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


def test_queued_requests_are_ranked_in_queue_order_up_to_the_budget():
    rng = random.Random(3)
    pool = BlockPool(512, BS)
    ts = TimeScheduler(TimeConfig(), pool, Lifecycle(lambda: 0.0), CopyTracker(pool, None))
    waiting: list[Request] = []
    n = 0
    for step in range(30):
        for _ in range(rng.randrange(0, 25)):
            waiting.append(_random_request(rng, n))
            n += 1
        for _ in range(rng.randrange(0, 8)):
            if waiting:
                waiting.pop(rng.randrange(len(waiting)))
        expected = _rank_reference(waiting)
        before = {r.request_id for r in waiting if r.reuse_ranked}
        ts._rank_queued(waiting)
        ranked = [r.request_id for r in waiting if r.reuse_ranked and r.request_id not in before]
        assert ranked == expected, step


def test_inflight_hashes_are_the_prefilling_requests_uncomputed_blocks():
    rng = random.Random(11)
    for trial in range(30):
        running = [_random_request(rng, i) for i in range(rng.randrange(0, 40))]
        expected: set[bytes] = set()
        for r in running:
            if r.is_prefill:
                expected.update(r.block_hashes(BS)[r.num_computed_tokens // BS :])
        assert inflight_hashes(running, BS) == expected, trial
