"""The core's logged waiting queue (``scheduler/waiting_queue.py``): a list whose appends and
removes are logged, whose other changes make every mark stale, and whose net changes name
the requests that left and joined, the latter in queue order."""

from __future__ import annotations

import pickle
import random

from tokencake.scheduler import waiting_queue
from tokencake.scheduler.request import Request
from tokencake.scheduler.waiting_queue import WaitingQueue, net_changes


def _reqs(n: int) -> list[Request]:
    return [Request(f"r{i}", [1], 1, float(i)) for i in range(n)]


def test_net_changes_against_the_queue_before_and_after():
    rng = random.Random(0)
    pool = _reqs(40)
    q = WaitingQueue(pool[:10])
    for step in range(300):
        before = list(q)
        mark = q.mark()
        for _ in range(rng.randrange(0, 8)):
            if q and rng.random() < 0.5:
                q.remove(rng.choice(q))
            else:
                r = rng.choice(pool)
                if r not in q:
                    q.append(r)
        left, joined = net_changes(q.since(mark))
        assert set(left) == set(before) - set(q), step
        assert joined == [r for r in q if r not in before], step  # in queue order


def test_unlogged_changes_make_marks_stale():
    a, b, c = _reqs(3)
    for change in (
        lambda q: q.insert(0, c),
        lambda q: q.extend([c]),
        lambda q: q.pop(),
        lambda q: q.sort(key=lambda r: -r.arrival_time),
        lambda q: q.reverse(),
        lambda q: q.clear(),
        lambda q: q.__setitem__(0, c),
        lambda q: q.__delitem__(0),
        lambda q: q.__iadd__([c]),
        lambda q: q.__imul__(2),
    ):
        q = WaitingQueue([a, b])
        mark = q.mark()
        q.append(c)
        assert q.since(mark) == ([c], bytearray([1]))
        change(q)
        assert q.since(mark) is None and q.since(q.mark()) == ([], bytearray())
    assert WaitingQueue().since(None) is None
    assert WaitingQueue([a]).since(WaitingQueue([a]).mark()) is None  # another queue's mark


def test_the_log_keeps_the_recent_changes(monkeypatch):
    monkeypatch.setattr(waiting_queue, "_LOG_LIMIT", 8)
    reqs = _reqs(30)
    q = WaitingQueue()
    old = q.mark()
    for r in reqs[:6]:
        q.append(r)
    recent = q.mark()
    for r in reqs[6:]:
        q.append(r)
    assert q.since(old) is None  # older than the log: the consumer passes over the queue
    assert q.since(recent) is None or net_changes(q.since(recent))[1] == reqs[6:]
    assert net_changes(q.since(q.mark()))[1] == []
    assert list(q) == reqs


def test_a_pickled_queue_is_a_queue():
    q = WaitingQueue(_reqs(3))
    q.remove(q[0])
    back = pickle.loads(pickle.dumps(q))
    assert type(back) is WaitingQueue and [r.request_id for r in back] == ["r1", "r2"]
    assert back.since(back.mark()) == ([], bytearray())
