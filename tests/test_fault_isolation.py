"""Issue 15, fault isolation: one request's bad data aborts that request only.

Validation normally stops bad metadata at the door; these tests bypass it on purpose
(``object.__setattr__`` on a frozen AgentMetadata, a policy that raises) to check the second
line of defence: the scheduler attributes the exception to the culprit, aborts it with a
``RequestFault``, keeps every other request running and leaves both pools consistent.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from tokencake.async_engine import AsyncEngine
from tokencake.memory.block_pool import BlockPool
from tokencake.memory.host_pool import HostBlockPool
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.core import Scheduler, SchedulerConfig
from tokencake.scheduler.faults import RequestFault, StepFailed
from tokencake.scheduler.lifecycle import LifecycleState
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.policy import Admission, Policy
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step

CFG = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=96, max_prefill_chunk=64,
                      max_model_len=400)  # fmt: skip


def _poison(m: AgentMetadata, **fields) -> AgentMetadata:
    """Set fields behind validation's back (what a buggy in-process caller could do)."""
    for k, v in fields.items():
        object.__setattr__(m, k, v)
    return m


def _sim(policy, blocks: int = 120, host_blocks: int = 40):
    clock = SimClock()
    pool = BlockPool(blocks, 16)
    host = HostBlockPool(host_blocks, 16) if host_blocks else None
    s = Scheduler(CFG, pool, policy, clock, host_pool=host)
    return s, SimExecutor(clock), pool, host, clock


def _drive(s, ex, pool, host, limit: int = 20_000) -> list[RequestFault]:
    faults: list[RequestFault] = []
    for _ in range(limit):
        if not s.has_work and s.copies.in_flight == 0:
            break
        sim_step(s, ex)
        faults += [f for _, f in s.faults.pop()]
        pool.check_integrity()
        if host is not None:
            host.check_integrity()
    assert not s.has_work
    return faults


def _requests(clock, n: int, agent_type: str = "coder") -> list[Request]:
    return [
        Request(f"r{i}", list(range(10 + i, 60 + i)), 12, clock(),
                metadata=AgentMetadata(agent_type=agent_type, importance=float(i % 3), depth=i % 4,
                                       join_group="g", application_started_at_s=0.5))
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "field,value",
    [
        ("importance", 1e308),
        ("importance", math.inf),
        ("memory_weight", 1e308),
        ("similarity", 5e-324),
        ("depth", 10**400),
        ("application_elapsed_s", math.nan),
    ],
)
@pytest.mark.parametrize("policy", ["tokencake", "tokencake-space", "tokencake-fcfs"])
def test_a_poisoned_request_is_aborted_alone(policy, field, value):
    """Finding 1 with validation bypassed: the culprit gets a RequestFault, the 19 innocent
    requests finish with every token, and the pools stay consistent."""
    s, ex, pool, host, clock = _sim(policy)
    reqs = _requests(clock, 20)
    for r in reqs:
        s.add_request(r)
    _poison(reqs[7].metadata, **{field: value})
    faults = _drive(s, ex, pool, host)
    assert [f.request_id for f in faults] == ["r7"]
    assert reqs[7].status is RequestStatus.FINISHED_ABORTED
    for r in reqs[:7] + reqs[8:]:
        assert r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 12
    assert s.lifecycle.records["r7"].cause == "aborted"
    assert pool.num_free == pool.capacity - pool.num_cached or pool.num_used == 0


def test_a_request_poisoned_while_running_is_aborted_alone():
    s, ex, pool, host, clock = _sim("tokencake")
    reqs = _requests(clock, 8)
    for r in reqs:
        s.add_request(r)
    for _ in range(3):
        sim_step(s, ex)
    assert reqs[2].status is RequestStatus.RUNNING
    _poison(reqs[2].metadata, application_elapsed_s=math.nan)
    # The Space Scheduler reads a request's metadata into its score table once, when it first
    # scores it. Drop r2's row so the forced rescore reads the poisoned metadata again, as it
    # would for data that turned bad between two readings.
    s.policy.space.table.drop(reqs[2])
    s.policy.space._scored_at = -math.inf  # force a rescore of everyone (join groups)
    faults = _drive(s, ex, pool, host)
    assert [f.request_id for f in faults] == ["r2"]
    assert sum(r.status is RequestStatus.FINISHED_LENGTH for r in reqs) == 7


class _Picky(Policy):
    """A policy with a bug that only one request's data triggers."""

    name = "picky"

    def __init__(self, ctx, where: str) -> None:
        super().__init__(ctx)
        self.where = where

    @staticmethod
    def _bad(r: Request) -> bool:
        return r.metadata is not None and r.metadata.agent_type == "boom"

    def on_step(self, now, running, waiting) -> None:  # a batch-wide phase
        if self.where == "on_step" and any(self._bad(r) for r in waiting):
            raise ZeroDivisionError("batch-wide")

    def check_request(self, request, now) -> None:  # the probe finds the culprit
        if self.where == "on_step" and self._bad(request):
            raise ZeroDivisionError("probe")

    def admit(self, request, blocks_needed, running) -> Admission:
        if self.where == "admit" and self._bad(request):
            raise KeyError("per-request")
        return Admission.ADMIT

    def on_finished(self, request) -> None:
        if self.where == "on_finished" and self._bad(request):
            raise RuntimeError("finish hook")

    def on_generation_finished(self, request) -> None:
        if self.where == "on_generation_finished" and self._bad(request):
            raise RuntimeError("generation-finished hook")


@pytest.mark.parametrize("where", ["on_step", "admit", "on_finished", "on_generation_finished"])
def test_culprit_found_by_probe_by_admission_or_logged_at_finish(where):
    s, ex, pool, host, clock = _sim(lambda ctx: _Picky(ctx, where))
    good = _requests(clock, 5)
    # A prefix shared with r0, so the bad one takes cached blocks before admit raises.
    bad = Request(
        "bad", list(range(10, 60)), 12, clock(), metadata=AgentMetadata(agent_type="boom")
    )
    for r in good[:2] + [bad] + good[2:]:
        s.add_request(r)
    faults = _drive(s, ex, pool, host)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in good)
    if where in ("on_finished", "on_generation_finished"):  # it had ended: logged, not aborted
        assert faults == [] and s.faults.count == 1
        assert bad.status is RequestStatus.FINISHED_LENGTH
    else:
        assert [f.request_id for f in faults] == ["bad"]
        assert bad.status is RequestStatus.FINISHED_ABORTED and bad.block_ids == []


def test_unexplained_failure_is_the_engines_and_propagates():
    class Broken(Policy):
        def on_step(self, now, running, waiting) -> None:
            raise RuntimeError("engine bug")

    s, ex, pool, host, clock = _sim(Broken)
    s.add_request(Request("a", [1, 2, 3], 4, clock()))
    with pytest.raises(RuntimeError, match="engine bug"):
        s.schedule()
    assert s.requests["a"].status is RequestStatus.WAITING  # nobody was blamed


def test_a_faulting_lifecycle_is_ended_and_its_kv_released():
    """The Time Scheduler's tick works lifecycle by lifecycle; one that breaks it is ended
    (cause 'error'), the others keep their preservation."""
    s, ex, pool, host, clock = _sim("tokencake")
    md = dict(agent_type="t", offload_eligible=True, reusable_prefix=True)
    reqs = [Request(f"a{i}", list(range(100 * i, 100 * i + 40)), 4, clock(), metadata=dict(md))
            for i in range(1, 4)]  # fmt: skip
    for r in reqs:
        s.add_request(r)
    _drive(s, ex, pool, host)
    for r in reqs:
        disp, _ = s.lifecycle_event({"event": "stall_started", "lifecycle_id": r.request_id,
                                     "estimated_duration_s": 5.0})  # fmt: skip
        assert disp.http_status == 200
    rec = s.lifecycle.records["a2"]
    _poison(rec.metadata, agent_type=["unhashable"])  # the tick's score lookup raises on it
    for _ in range(5):
        sim_step(s, ex)
        assert [f.request_id for _, f in s.faults.pop()] in ([], ["a2"])
    assert rec.state is LifecycleState.TERMINAL and rec.cause == "error"
    assert "a2" not in s.policy.time.items
    for lid in ("a1", "a3"):
        assert not s.lifecycle.records[lid].terminal and lid in s.policy.time.items
    pool.check_integrity()
    host.check_integrity()


def test_an_event_that_breaks_on_its_lifecycle_ends_only_that_lifecycle():
    s, ex, pool, host, clock = _sim("tokencake")
    reqs = [Request(f"e{i}", list(range(50 * i, 50 * i + 30)), 3, clock(),
                    metadata=dict(agent_type="t")) for i in range(1, 3)]  # fmt: skip
    for r in reqs:
        s.add_request(r)
    _drive(s, ex, pool, host)
    _poison(s.lifecycle.records["e1"].metadata, agent_type=["unhashable"])
    disp, body = s.lifecycle_event({"event": "stall_started", "lifecycle_id": "e1"})
    assert disp.http_status == 400 and "e1" in body["error"]
    assert s.lifecycle.records["e1"].cause == "error"
    disp, _ = s.lifecycle_event({"event": "stall_started", "lifecycle_id": "e2"})
    assert disp.http_status == 200


# ---- the real engine ----------------------------------------------------------------------------
def test_real_engine_poisoned_stream_is_the_only_casualty(make_engine):
    """Finding 1 end to end: 20 streams in flight, one with metadata poisoned behind
    validation's back; the 19 others finish with exactly the tokens they get alone."""
    engine = make_engine(policy="tokencake")
    ae = AsyncEngine(engine)
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def meta(i: int) -> AgentMetadata:
        return AgentMetadata(agent_type=f"t{i % 3}", depth=i % 5, importance=1.0)

    async def one(i: int, poisoned: bool):
        m = meta(i)
        if poisoned:
            _poison(m, importance=1e308)
        return await ae.generate(f"prompt {i} " * 3, params, metadata=m)

    async def main():
        res = await asyncio.gather(*(one(i, i == 11) for i in range(20)), return_exceptions=True)
        alone = await ae.generate("prompt 3 " * 3, params, metadata=meta(3))
        return res, alone

    try:
        res, alone = asyncio.run(main())
    finally:
        ae.shutdown()
    assert isinstance(res[11], RequestFault) and res[11].request_id and res[11].status == 400
    innocents = [r for i, r in enumerate(res) if i != 11]
    assert all(not isinstance(r, BaseException) and r.finished for r in innocents)
    assert res[3].token_ids == alone.token_ids
    assert engine.pool.num_used == 0


def test_device_failure_fails_only_that_steps_rows(make_engine):
    """Requests still waiting when the device step fails are not aborted."""
    engine = make_engine(max_num_seqs=2)
    # The device call itself fails (dispatch: the synchronous and the overlapped step both
    # go through it).
    real = engine.runner.dispatch
    calls = {"n": 0}

    def flaky(rows, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected device failure")
        return real(rows, *args, **kwargs)

    engine.runner.dispatch = flaky
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    ids = [engine.add_request(f"q{i} xx", params) for i in range(5)]
    errors, done = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out.error
            elif out.finished:
                done[out.request_id] = out
    assert set(errors) == set(ids[:2]) and all(isinstance(e, StepFailed) for e in errors.values())
    assert set(done) == set(ids[2:]) and all(len(o.token_ids) == 4 for o in done.values())
    assert engine.pool.num_used == 0


def test_postprocessing_fault_aborts_only_that_request(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    a = engine.add_request("alpha", params)
    b = engine.add_request("bravo", params)

    def boom(tok):
        raise UnicodeError("detokenizer broke")

    engine._text[b].detok.feed = boom
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    assert outs[a].error is None and len(outs[a].token_ids) == 5
    assert isinstance(outs[b].error, RequestFault) and "postprocessing" in str(outs[b].error)
    assert engine.pool.num_used == 0 and not engine._text
