"""The kept admission orders (``scheduler/queue_order.py``, ``scheduler/score_order.py``)
against plain sorts: ties broken by id exactly as a sort by the full key breaks them, and a
kept order that follows a queue through admissions, preemptions and arrivals."""

from __future__ import annotations

import random

from tokencake.scheduler.queue_order import KeptOrder
from tokencake.scheduler.request import Request
from tokencake.scheduler.score_order import ScoreOrder
from tokencake.scheduler.score_table import ScoreTable


def _scored_table(rng: random.Random, n: int) -> tuple[ScoreTable, list[Request]]:
    """``n`` requests with scores and arrivals from small sets (many full ties)."""
    t = ScoreTable(capacity=8)
    reqs = []
    for i in range(n):
        rid = rng.choice(["", "a", "b", "é", "z"]) + str(rng.randrange(10_000)) + f"-{i}"
        r = Request(rid, [1], 1, rng.choice([0.0, -0.0, 0.5, 1.0]))
        j = t.add(r, (0.0, 0.0, 0.0), None)
        own = rng.choice([-3, 0, 7])
        t.own[j], t.eff[j], t.scored[j] = own, own + rng.choice([0, 0, 5]), True
        reqs.append(r)
    rng.shuffle(reqs)
    return t, reqs


def _full_key(t: ScoreTable, r: Request) -> tuple[int, int, float, str]:
    i = t.row[r]
    return (-int(t.eff[i]), -int(t.own[i]), r.arrival_time, r.request_id)


def test_sort_breaks_full_ties_by_id():
    rng = random.Random(0)
    for n in (0, 1, 2, 50, 400):
        t, reqs = _scored_table(rng, n)
        order = ScoreOrder(t)
        got = order.sort(reqs, t.rows(reqs))
        assert got == sorted(reqs, key=lambda r: _full_key(t, r))
        assert order.valid
        assert order._rows.tolist() == [t.row[r] for r in got]


def test_kept_order_follows_a_queue():
    rng = random.Random(1)
    t, pool = _scored_table(rng, 600)
    order = ScoreOrder(t)
    queue = pool[:100]
    rest = pool[100:]
    assert order.update(queue) is None  # nothing kept yet: the caller sorts
    order.sort(queue, t.rows(queue))
    for _ in range(200):
        for r in rng.sample(queue, min(len(queue), rng.choice([0, 1, 3, 12]))):
            queue.remove(r)  # admitted
            if rng.random() < 0.2:
                rest.append(r)  # comes back later (preempted)
        for _ in range(rng.choice([0, 1, 2, 9])):
            if rest:
                queue.append(rest.pop(rng.randrange(len(rest))))
        got = order.update(queue)
        assert got == sorted(queue, key=lambda r: _full_key(t, r))
        assert order._rows.tolist() == [t.row[r] for r in got]
    assert order.full_sorts == 1


def test_a_request_twice_or_an_unscored_newcomer_means_a_full_sort():
    t, reqs = _scored_table(random.Random(2), 20)
    order = ScoreOrder(t)
    order.sort(reqs, t.rows(reqs))
    assert order.update(reqs + reqs[:1]) is None and not order.valid
    order.sort(reqs, t.rows(reqs))
    t.scored[t.row[reqs[0]]] = False
    assert order.update(reqs[1:]) is not None  # it left: fine
    assert order.update(reqs) is None  # back without a score: no rank for it


def test_a_sync_without_its_place_is_not_trusted():
    queue = [Request(f"r{i}", [1], 1, float(i)) for i in range(5)]
    order = KeptOrder(key=lambda r: r.arrival_time)
    order.reset(list(queue), queue)
    assert order.sync(queue + [Request("x", [1], 1, 9.0)]) is not None  # not placed ...
    assert order.update(queue) is None  # ... so the next step sorts from scratch
    assert order.full_sorts == 1
