"""The fast scheduling paths of issue 17 item 4 decide exactly what a plain full recomputation
decides.

* vectorized scores (``score_table.py``) against the scalar ``request_score``;
* the Space Scheduler's frozen scores, join-group maxima, best waiting scores and admission
  order (``space_scoring.py``) against :class:`Reference`, the straightforward algorithm they
  replace (rescore everything every ``score_refresh_s``, score newcomers in queue order in
  between, sort the whole queue every step), on random queues that grow, get admitted,
  preempted and finished;
* program-level FCFS sorted incrementally (``queue_order.py``) against a full sort;
* the Time Scheduler's tick, which visits only items that are not dormant, against a tick that
  visits every item, on a workload with tool calls: the same plans, step for step.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.agent_scores import request_score, static_parts
from tokencake.scheduler.core import Scheduler, SchedulerConfig
from tokencake.scheduler.faults import RequestFault
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.queue_order import SortedQueue, application_fcfs
from tokencake.scheduler.request import Request
from tokencake.scheduler.score_table import ScoreTable
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step
from tokencake.scheduler.space import SpaceScheduler
from tokencake.scheduler.space_scoring import Scored
from tokencake.scheduler.time_sched import TimeScheduler
from tokencake.scheduler.tokencake_config import SpaceConfig


def _random_metadata(rng: random.Random) -> AgentMetadata:
    """Random hints, with many ties (small value sets) and some extreme but valid values."""
    big = rng.random() < 0.1
    return AgentMetadata(
        agent_type=rng.choice(["", "a", "b", "c", "d"]),
        importance=rng.choice([0.0, 1.0, 2.5, 9.0]) if not big else rng.uniform(0, 1e6),
        depth=rng.randrange(0, 6),
        out_degree=rng.randrange(0, 3),
        in_degree=rng.randrange(0, 3),
        similarity=rng.choice([0.0, 1.0, 0.5, 1 / 3]),
        remaining_depth=rng.randrange(0, 6),
        application_max_depth=rng.choice([0, 5]),
        application_started_at_s=rng.choice([0.0, 1.0, 2.0, 7.25]),
        application_elapsed_s=rng.choice([0.0, 3.0, 400.0]) if not big else rng.uniform(0, 1e9),
        application_start_offset_s=rng.choice([0.0, 30.0, 90.0]),
        join_group=rng.choice(["", "", "g1", "g2"]),
        critical_path=rng.random() < 0.2,
        fanout_width=rng.randrange(1, 4),
        memory_weight=rng.choice([0.0, 1.0, 2.0]),
    )


_HINTS = [_random_metadata(random.Random(i)) for i in range(60)]


def _metadata(rng: random.Random, ordinary: float = 0.1) -> AgentMetadata | None:
    """One of a fixed set of hints (building validated metadata is slow), or none (with
    probability ``ordinary``)."""
    return None if rng.random() < ordinary else rng.choice(_HINTS)


def test_vectorized_scores_equal_the_scalar_score():
    rng = random.Random(0)
    table = ScoreTable(capacity=4)  # grows
    reqs = []
    for i in range(1000):
        m = _random_metadata(rng) if i < 200 else _metadata(rng) or AgentMetadata()
        r = Request(f"r{i}", [1], 1, rng.choice([0.0, 0.5, rng.uniform(0, 500)]), metadata=m)
        table.add(r, static_parts(m), None)
        reqs.append(r)
    for every_started in (False, True):
        if every_started:  # rows without an application start leave: no np.where then
            assert table._unstarted > 0
            for r in reqs:
                if not r.metadata.application_started_at_s > 0:
                    table.drop(r)
            reqs = [r for r in reqs if r.metadata.application_started_at_s > 0]
            assert table._unstarted == 0
        rows = table.rows(reqs)
        for now in (0.0, 0.3, 1.0, 7.25, 99.9, 1234.5, 1e7):
            got = table.own_scores(rows, now)
            assert got is not None
            assert got.tolist() == [request_score(r.metadata, r.arrival_time, now) for r in reqs]


class Reference:
    """The Space Scheduler's scores and order computed the plain way: a dict of scores by
    request id, a Python loop for a refresh, a full sort of the queue for the order."""

    def __init__(self, cfg: SpaceConfig) -> None:
        self.cfg = cfg
        self.scores: dict[str, Scored] = {}
        self.groups: dict[tuple[float, str], int] = {}
        self.best: dict[str, int] = {}
        self.scored_at = -math.inf

    def group_of(self, m: AgentMetadata) -> tuple[float, str] | None:
        if self.cfg.inherit_join_priority and m.join_group and m.application_started_at_s > 0:
            return (m.application_started_at_s, m.join_group)
        return None

    def step(self, now, running, waiting, reserved_before, critical_after, repartitioned):
        """One ``begin_step``'s scoring: a refresh when due (best scores under the plan the
        step started with), else newcomers; best scores again after a repartition."""
        if now - self.scored_at >= self.cfg.score_refresh_s:
            self.scored_at = now
            scores, groups, grouped = {}, {}, []
            both = [(r, False) for r in waiting] + [(r, True) for r in running]
            for r, is_running in both:
                m = r.metadata
                g = self.group_of(m) if m is not None else None
                if m is None or (is_running and g is None):
                    continue
                s = request_score(m, r.arrival_time, now)
                scores[r.request_id] = Scored(s, s)
                if g is not None:
                    groups[g] = max(groups.get(g, s), s)
                    grouped.append((r, g))
            for r, g in grouped:
                scores[r.request_id] = Scored(scores[r.request_id].own, groups[g])
            self.scores, self.groups = scores, groups
            self.best_of(waiting, reserved_before)
        else:
            for r in waiting:
                if r.metadata is None or r.request_id in self.scores:
                    continue
                s = request_score(r.metadata, r.arrival_time, now)
                g = self.group_of(r.metadata)
                eff = max(s, self.groups.get(g, s)) if g is not None else s
                if g is not None:
                    self.groups[g] = eff
                self.scores[r.request_id] = Scored(s, eff)
                k = r.metadata.agent_type
                if k in reserved_before:
                    self.best[k] = max(self.best.get(k, eff), eff)
        if repartitioned:
            self.best_of(waiting, critical_after)

    def best_of(self, waiting, critical):
        best = {}
        for r in waiting:
            if r.metadata is not None and r.metadata.agent_type in critical:
                e = self.scores[r.request_id].eff
                best[r.metadata.agent_type] = max(best.get(r.metadata.agent_type, e), e)
        self.best = best

    def order(self, waiting, bands: bool) -> list[str]:
        native = sorted(waiting, key=lambda r: (r.arrival_time, r.request_id))
        cut = next((i for i, r in enumerate(native) if r.metadata is None), len(native))
        sc = self.scores
        head = sorted(native[:cut], key=lambda r: (-sc[r.request_id].eff, -sc[r.request_id].own,
                                                   r.arrival_time, r.request_id))  # fmt: skip
        if bands:  # every affinity is (0.0, 0) here (nothing cached): bands keep their order
            band, out, i = self.cfg.cache_affinity_score_band, [], 0
            while i < len(head):
                top, j = sc[head[i].request_id].eff, i
                while j < len(head) and sc[head[j].request_id].eff >= top - band:
                    j += 1
                out += head[i:j]
                i = j
            head = out
        return [r.request_id for r in head + native[cut:]]


@pytest.mark.parametrize(("seed", "ordinary"), [(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.0), (4, 0.0),
                                                (5, 0.002)])  # fmt: skip
def test_space_scores_and_order_equal_a_full_recomputation(seed, ordinary):
    """Also with every request annotated (``ordinary`` 0), where the order is kept between
    refreshes (``score_order.py``) and only sorted from scratch after one."""
    rng = random.Random(seed)
    cfg = SpaceConfig(adjustment_window=rng.choice([3, 7, 500]))
    pool = BlockPool(4096, 16)
    sp = SpaceScheduler(cfg, pool, 4096)
    ref = Reference(cfg)
    waiting: list[Request] = []
    running: list[Request] = []
    now, n, refreshes = 0.0, 0, 0
    for _ in range(100):
        for _ in range(rng.choice([0, 0, 1, 3, 25])):  # arrivals, often at the same time
            arrival = now if rng.random() < 0.7 else rng.uniform(0, now + 1e-9)
            md = _metadata(rng, ordinary)
            waiting.append(Request(f"q{n}", [1] * 4, 4, arrival, metadata=md))
            n += 1
        for r in rng.sample(waiting, min(len(waiting), rng.choice([0, 1, 5, 30]))):
            waiting.remove(r)  # admitted
            running.append(r)
        for r in rng.sample(running, min(len(running), rng.choice([0, 0, 1, 4]))):
            running.remove(r)  # preempted: requeued at the end
            waiting.append(r)
        for r in rng.sample(running, min(len(running), rng.choice([0, 2, 10]))):
            running.remove(r)  # finished
            sp.on_finished(r, now)
            ref.scores.pop(r.request_id, None)
        if rng.random() < 0.05:  # an id reused by a new request after its owner finished
            gone = f"q{rng.randrange(n)}"
            if all(r.request_id != gone for r in waiting + running):
                waiting.append(Request(gone, [1] * 4, 4, now, metadata=_metadata(rng, ordinary)))
        now += rng.choice([0.0, 0.01, 0.03, 0.1, 0.25])
        before = sp.plan
        reserved_before = set(before.reserved) if before is not None else set()
        sp.begin_step(now, running, waiting, 0)
        ref.step(now, running, waiting, reserved_before, sp.plan.critical, sp.plan is not before)
        assert sp.scores == ref.scores
        assert sp.groups == ref.groups
        assert sp.best_waiting == ref.best
        bands = rng.random() < 0.3
        sp.uncommitted = 0 if bands else pool.capacity  # high committed pressure: bands
        assert [r.request_id for r in sp.order(waiting)] == ref.order(waiting, bands)
        kept = sp._order
        # the table marks exactly the kept order's rows (none while it is invalid)
        marked = np.flatnonzero(sp.table.queued).tolist()
        assert marked == sorted(sp.table.row[r] for r in kept._ranked)
        # the table's count of live rows without metadata (a refresh reads it), kept by
        # add/drop, is the count over its rows
        assert sp.table.plain == sum(r.metadata is None for r in sp.table.row)
        for r in running:
            if r.request_id in ref.scores:
                assert sp.effective(r) == ref.scores[r.request_id].eff
        refreshes += sp._scored_at == now
        if rng.random() < 0.02 and waiting:  # a score set by hand: the kept order is stale
            r = rng.choice(waiting)
            if r.metadata is not None:
                s = rng.randrange(-50, 3000)
                sp.set_score(r, s, s)
                ref.scores[r.request_id] = Scored(s, s)
                refreshes += 1
    if ordinary == 0:  # the kept order served the steps between refreshes (and hand sets)
        assert sp._order.full_sorts <= refreshes + 1


def test_sorted_queue_equals_a_full_sort():
    rng = random.Random(1)
    q = SortedQueue()
    queue: list[Request] = []
    for step in range(300):
        for _ in range(rng.choice([0, 1, 20])):
            queue.append(Request(f"r{step}-{len(queue)}", [1], 1, rng.choice([0.0, step / 10]),
                                 metadata=_metadata(rng)))  # fmt: skip
        for r in rng.sample(queue, min(len(queue), rng.choice([0, 2, 15]))):
            queue.remove(r)
            if rng.random() < 0.3:
                queue.append(r)  # requeued
        assert q.order(queue) == application_fcfs(queue)
    assert q.full_sorts == 1  # then kept: departed requests removed, newcomers inserted


def _tool_workload(full_visit: bool, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Agents calling tools under memory pressure on the simulator; every step's plan."""
    if full_visit:  # the tick before issue 17: every item, in creation order
        monkeypatch.setattr(TimeScheduler, "_visit", lambda self: list(self.items.values()))
    rng = random.Random(5)
    clock = SimClock()
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=96, max_prefill_chunk=64,
                          max_model_len=400)  # fmt: skip
    s = Scheduler(cfg, BlockPool(44, 16), "tokencake", clock, host_pool=HostBlockPool(64, 16))
    ex = SimExecutor(clock)
    agents = [dict(prompt=[rng.randrange(1, 500) for _ in range(rng.randrange(20, 90))], turn=0,
                   due=0.0, last=None, end=None) for _ in range(6)]  # fmt: skip
    trace: list[tuple] = []
    for _ in range(20_000):
        now = clock()
        for i, ag in enumerate(agents):
            if ag["end"] is not None and now >= ag["end"]:
                s.lifecycle_event({"event": "stall_finished", "lifecycle_id": ag["last"]})
                ag["end"], ag["due"] = None, now
            if ag["due"] is not None and now >= ag["due"] and ag["turn"] < 3:
                md = dict(agent_type=f"t{i % 3}", importance=float(i % 4), depth=ag["turn"],
                          offload_eligible=True, reusable_prefix=True)  # fmt: skip
                s.add_request(Request(f"a{i}-{ag['turn']}", list(ag["prompt"]),
                                      rng.randrange(4, 40), now, metadata=md))  # fmt: skip
                ag["due"] = None
        if not s.has_work and s.copies.in_flight == 0 and all(a["turn"] >= 3 for a in agents):
            break
        plan, finished = sim_step(s, ex)
        trace.append((clock(), [(c.request.request_id, c.start, c.num_tokens) for c in plan.chunks],
                      [(c.direction, c.device_blocks, c.host_blocks) for c in plan.copies],
                      [r.request_id for r in plan.preempted]))  # fmt: skip
        for r in finished:
            ag = agents[int(r.request_id[1:].split("-")[0])]
            ag["prompt"] = ag["prompt"] + r.output_token_ids + [7] * 8
            ag["turn"] += 1
            ag["last"] = r.request_id
            if ag["turn"] < 3:
                d = rng.choice((0.02, 0.3, 3.0))
                s.lifecycle_event({"event": "stall_started", "lifecycle_id": r.request_id,
                                   "kind": "tool", "estimated_duration_s": d})  # fmt: skip
                ag["end"] = clock() + d * rng.uniform(0.3, 2.0)
    else:
        raise AssertionError("workload did not finish")
    trace.append(tuple(sorted(s.policy.counters.items())))
    return trace


def test_time_scheduler_tick_equals_a_full_visit(monkeypatch):
    fast = _tool_workload(False, monkeypatch)
    assert any(copies for _, _, copies, _ in fast[:-1])  # the Time Scheduler did copy
    assert _tool_workload(True, monkeypatch) == fast


@pytest.mark.parametrize("culprit", ["waiting", "running"])
def test_a_refresh_that_meets_a_non_finite_score_blames_its_request(culprit):
    """The vectorized refresh hands a non-finite score to the scalar path, which raises the
    fault of the request at fault (a waiting one, or a running one in a join group)."""
    sp = SpaceScheduler(SpaceConfig(), BlockPool(4096, 16), 4096)
    grouped = next(m for m in _HINTS if m.join_group and m.application_started_at_s > 0)
    waiting = [Request(f"w{i}", [1] * 4, 4, 0.0, metadata=_HINTS[i]) for i in range(20)]
    running = [Request(f"r{i}", [1] * 4, 4, 0.0, metadata=grouped) for i in range(5)]
    sp.begin_step(1.0, running, waiting, 0)
    bad = waiting[7] if culprit == "waiting" else running[3]
    sp.table.static[sp.table.row[bad]] = math.inf  # (validated metadata never gets there)
    with pytest.raises(RequestFault) as err:
        sp.begin_step(2.0, running, waiting, 0)  # a refresh (score_refresh_s passed)
    assert err.value.request_id == bad.request_id
