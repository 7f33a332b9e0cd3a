"""The kept FCFS order (``scheduler/arrival_order.py``) against ``sorted(queue,
key=arrival_time)`` (stable: equal arrivals keep their queue order) on the core's logged queue,
through arrivals at equal times, admissions, requests back at the end within one step, a
request twice, unlogged changes and plain lists."""

from __future__ import annotations

import random
from operator import attrgetter

import pytest

from tokencake.scheduler.arrival_order import ArrivalOrder
from tokencake.scheduler.request import Request
from tokencake.scheduler.waiting_queue import WaitingQueue

_ARRIVAL = attrgetter("arrival_time")


@pytest.mark.parametrize("seed", range(4))
def test_kept_fcfs_order_is_the_stable_sort(seed):
    rng = random.Random(seed)
    pool = [Request(f"r{i}", [1], 1, float(rng.choice([0, 1, 1, 2, 3, -0.0]))) for i in range(300)]
    queue = WaitingQueue(pool[:50])
    away = pool[50:]
    order = ArrivalOrder()
    for step in range(300):
        for _ in range(rng.choice([0, 1, 3, 8])):
            if queue:
                r = rng.choice(queue)
                queue.remove(r)  # admitted
                if rng.random() < 0.2:
                    queue.append(r)  # back at the end within the same step
                elif rng.random() < 0.3:
                    away.append(r)
        for _ in range(rng.choice([0, 1, 2, 6])):
            if away:
                queue.append(away.pop(rng.randrange(len(away))))
        if rng.random() < 0.03 and queue:
            queue.insert(0, queue.pop())  # unlogged: sorted from scratch
        if rng.random() < 0.02 and queue:
            queue.append(queue[0])  # a request twice: sorted from scratch until it is gone
        assert order.order(queue) == sorted(queue, key=_ARRIVAL), step
        if len(set(queue)) != len(queue):
            queue.remove(queue[-1])
    assert order.full_sorts < 60  # kept on most steps


def test_a_plain_list_is_sorted_each_time():
    reqs = [Request(f"r{i}", [1], 1, float(3 - i % 3)) for i in range(9)]
    order = ArrivalOrder()
    for _ in range(3):
        assert order.order(reqs) == sorted(reqs, key=_ARRIVAL)
    assert order.full_sorts == 3
