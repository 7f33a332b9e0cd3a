"""The kept admission orders (``scheduler/queue_order.py``, ``scheduler/score_order.py``)
against plain sorts: ties broken by id exactly as a sort by the full key breaks them, and a
kept order that follows a queue through admissions, preemptions and arrivals; the tie labels
(``scheduler/tie_rank.py``) against Python's comparison of ``(arrival, id)``."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tokencake.scheduler import tie_rank
from tokencake.scheduler.queue_order import KeptOrder
from tokencake.scheduler.request import Request
from tokencake.scheduler.score_order import ScoreOrder
from tokencake.scheduler.score_table import ScoreTable
from tokencake.scheduler.tie_rank import TieRank
from tokencake.scheduler.waiting_queue import WaitingQueue


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


def _marked(t: ScoreTable) -> list[int]:
    """The rows the table's ``queued`` column marks (the kept order's)."""
    return np.flatnonzero(t.queued).tolist()


def test_sort_breaks_full_ties_by_id():
    rng = random.Random(0)
    for n in (0, 1, 2, 50, 400):
        t, reqs = _scored_table(rng, n)
        order = ScoreOrder(t)
        got = order.sort(reqs, t.rows(reqs))
        assert got == sorted(reqs, key=lambda r: _full_key(t, r))
        assert order.valid
        assert _marked(t) == sorted(t.row[r] for r in got)  # exactly the order's rows


@pytest.mark.parametrize("logged", [False, True])
def test_kept_order_follows_a_queue(logged):
    """With a plain list the order finds the changes by passing over the queue; with the
    core's logged queue it reads them off its log (and falls back after an unlogged change)."""
    rng = random.Random(1)
    t, pool = _scored_table(rng, 600)
    order = ScoreOrder(t)
    queue = WaitingQueue(pool[:100]) if logged else pool[:100]
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
        if logged and rng.random() < 0.05:
            queue.insert(0, queue.pop())  # not logged: the next sync passes over the queue
        got = order.update(queue)
        assert got == sorted(queue, key=lambda r: _full_key(t, r))
        assert _marked(t) == sorted(t.row[r] for r in got)  # exactly the order's rows
        assert order.update(queue) == got  # unchanged: the order as it is
    assert order.full_sorts == 1


def test_a_logged_queue_holding_a_request_twice_means_a_full_sort():
    t, reqs = _scored_table(random.Random(4), 20)
    queue = WaitingQueue(reqs)
    order = ScoreOrder(t)
    order.sort(queue, t.rows(queue))
    queue.append(queue[3])  # logged, but a request twice is no queue we keep
    assert order.update(queue) is None and not order.valid
    queue.remove(queue[3])
    order.sort(queue, t.rows(queue))
    other = WaitingQueue(queue)  # the same requests in another queue: its log is not ours
    other.remove(other[0])
    assert order.update(other) == sorted(other, key=lambda r: _full_key(t, r))


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


def test_tie_rank_by_hand():
    """Labels compare as ``(arrival, id)``: arrival first, then the id by code point ("é" is
    U+00E9, after every ASCII letter); -0.0 equals 0.0, so those keys share a label."""
    col = np.zeros(8, np.int64)
    ranks = TieRank()
    keys = {0: (1.0, "b"), 1: (1.0, "a"), 2: (0.5, "z"), 3: (1.0, "é"), 4: (-0.0, "a"),
            5: (0.0, "a"), 6: (1.0, "B")}  # fmt: skip
    for row, key in keys.items():
        ranks.add(key, row, col)
    by_label = sorted(keys, key=lambda row: col[row])
    assert by_label[:2] in ([4, 5], [5, 4]) and col[4] == col[5]
    assert by_label[2:] == [2, 6, 1, 0, 3]  # 0.5 "z"; 1.0 "B" < "a" < "b" < "é"
    ranks.remove(1)
    ranks.add((1.0, "a"), 7, col)  # a row reused for an equal key: between "B" and "b"
    assert col[6] < col[7] < col[0]


def _check_ranks(live: dict[int, tuple[float, str]], col: np.ndarray) -> None:
    """Labels order the live rows exactly as their keys do, equal keys equal labels."""
    rows = sorted(live, key=live.__getitem__)
    for a, b in zip(rows, rows[1:], strict=False):  # neighbours in key order
        if live[a] == live[b]:
            assert col[a] == col[b], (live[a], live[b])
        else:
            assert col[a] < col[b], (live[a], live[b])


@pytest.mark.parametrize("seed", range(4))
def test_tie_rank_follows_arrivals_and_removals(seed):
    """Random keys with many ties (few arrivals, ids from a small non-ASCII alphabet, equal
    keys on different rows), added and removed in random order, some runs of keys added
    into one gap (which exhausts it: a relabel), against Python's own comparison."""
    rng = random.Random(seed)
    col = np.zeros(400, np.int64)
    ranks = TieRank()
    live: dict[int, tuple[float, str]] = {}
    free = list(range(400))
    rng.shuffle(free)
    for step in range(600):
        if free and (rng.random() < 0.6 or not live):
            row = free.pop()
            if rng.random() < 0.1:  # a run into one gap: "m", "mm", "mmm", ... after "m"
                key = (0.5, "m" * (1 + sum(k[1].startswith("m") for k in live.values())))
            else:
                rid = rng.choice(["", "a", "é", "Z", "ab", "日"]) + rng.choice(["", "1", "a"])
                key = (rng.choice([0.0, -0.0, 0.5, 1.0, float(step)]), rid)
            ranks.add(key, row, col)
            live[row] = key
        else:
            row = rng.choice(list(live))
            ranks.remove(row)
            del live[row]
            free.append(row)
        assert len(ranks) == len(live)
        ordered = sorted(live.values())
        assert ranks._equal == sum(a == b for a, b in zip(ordered, ordered[1:], strict=False))
        if step % 25 == 0:
            _check_ranks(live, col)
    _check_ranks(live, col)


def test_tie_rank_relabels_when_a_gap_runs_out(monkeypatch):
    monkeypatch.setattr(tie_rank, "_LIMIT", 1 << 41)  # 512 gaps: 900 labels need a relabel
    col = np.zeros(1000, np.int64)
    ranks = TieRank()
    live = {999: (1.0, "c"), 998: (1.0, "a"), 997: (1.0, "a")}  # "a" again below: 3 equal
    for row in (999, 998, 997):
        ranks.add(live[row], row, col)
    for row in range(100):  # each key after the last, before "c": halves the same gap
        key = (1.0, "a" + "b" * row)
        ranks.add(key, row, col)
        live[row] = key
    assert ranks.relabels >= 2  # 2**32 halves 32 times
    _check_ranks(live, col)
    for row in (998, 997, 0):  # every (1.0, "a") leaves: no equal keys, the fast relabel
        ranks.remove(row)
        del live[row]
    assert ranks._equal == 0
    before = ranks.relabels
    for row in range(100, 900):  # each key first: walks down toward -_LIMIT
        key = (0.0, f"{1000 - row:04d}")
        ranks.add(key, row, col)
        live[row] = key
    assert ranks.relabels > before
    _check_ranks(live, col)


def test_score_table_ties_survive_growth_and_recycled_rows():
    """The table's ``tie`` column orders its rows like ``(arrival, id)`` while it grows and
    its rows are dropped and reused."""
    rng = random.Random(5)
    t = ScoreTable(capacity=4)
    live: list[Request] = []
    for i in range(300):
        if live and rng.random() < 0.4:
            t.drop(live.pop(rng.randrange(len(live))))
        rid = rng.choice(["x", "é", "y"]) + str(rng.randrange(50)) + f"/{i}"
        r = Request(rid, [1], 1, rng.choice([0.0, 1.0, float(i)]))
        t.add(r, (0.0, 0.0, 0.0), None)
        live.append(r)
    got = sorted(live, key=lambda r: t.tie[t.row[r]])
    assert got == sorted(live, key=lambda r: (r.arrival_time, r.request_id))


def test_a_newcomer_twice_means_a_full_sort():
    queue = [Request(f"r{i}", [1], 1, float(i)) for i in range(5)]
    order = KeptOrder(key=lambda r: r.arrival_time)
    order.reset(list(queue), queue)
    x = Request("x", [1], 1, 9.0)
    assert order.update(queue[1:] + [x, x]) is None and not order.valid
