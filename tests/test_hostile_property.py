"""Issue 15, property test: arbitrary metadata and event values (huge, tiny, subnormal, NaN,
long strings, wrong types) thrown at the live scheduler, on the simulator and on the real tiny
engine, among innocent requests. Whatever hypothesis draws: nothing answers 5xx, no innocent
request is aborted or loses a token, and both KV pools stay consistent after every step.

Hostile values reach the scheduler two ways: through the front door (dicts, validated: refused
or, when in range, accepted) and behind validation's back (``object.__setattr__`` on an
accepted ``AgentMetadata``), where fault isolation must contain them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_server import MODEL, post, request, stream, wait_pool_idle
from tokencake.memory.block_pool import BlockPool
from tokencake.memory.host_pool import HostBlockPool
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.config import SchedulerConfig
from tokencake.scheduler.core import Scheduler
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step

FIELDS = [f.name for f in dataclasses.fields(AgentMetadata) if f.name != "extra"]
NUMERIC = [f.name for f in dataclasses.fields(AgentMetadata) if f.type in ("int", "float")]

nasty_number = st.one_of(
    st.sampled_from(
        [
            10**400,
            -(10**400),
            9 * 10**306,
            2**63,
            2**64,
            1e308,
            -1e308,
            5e-324,
            2.2250738585072014e-308 / 3,
            math.nan,
            math.inf,
            -math.inf,
            0,
            -1,
            1e-300,
        ]
    ),  # fmt: skip
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**420), max_value=10**420),
)
nasty_string = st.one_of(
    st.text(max_size=40),
    st.integers(0, 20_000).map(lambda n: "x" * n),
    st.sampled_from(["a\n", "\x00", "tc-" + uuid.uuid4().hex + "\n", "é" * 300]),
)
nasty_value = st.one_of(nasty_number, nasty_string, st.booleans(), st.none(),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # fmt: skip
hostile_metadata = st.dictionaries(
    st.sampled_from(FIELDS + ["unknown_key"]), nasty_value, min_size=1, max_size=6
)
hostile_event = st.fixed_dictionaries(
    {"event": st.sampled_from(["stall_started", "stall_finished", "bogus"])},
    optional={
        "lifecycle_id": nasty_string,
        "kind": nasty_value,
        "estimated_duration_s": nasty_number,
    },  # fmt: skip
)
# Poison applied behind validation's back: a numeric field set to a value validation refuses.
poison = st.tuples(st.sampled_from(NUMERIC), nasty_number)

CFG = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=96, max_prefill_chunk=64,
                      max_model_len=400)  # fmt: skip


def _innocents(clock, n: int = 6) -> list[Request]:
    return [
        Request(f"good{i}", list(range(5 + 7 * i, 45 + 7 * i)), 8, clock(),
                metadata=dict(agent_type=f"t{i % 2}", depth=i % 3, importance=float(i % 4),
                              offload_eligible=True, reusable_prefix=True))
        for i in range(n)
    ]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["tokencake", "tokencake-space", "tokencake-time", "continuum", "vllm"]),
    metas=st.lists(hostile_metadata, min_size=1, max_size=4),
    poisons=st.lists(poison, max_size=3),
    events=st.lists(hostile_event, max_size=6),
)
def test_simulator_contains_any_hostile_input(policy, metas, poisons, events):
    clock = SimClock()
    pool, host = BlockPool(90, 16), HostBlockPool(30, 16)
    s = Scheduler(CFG, pool, policy, clock, host_pool=host)
    ex = SimExecutor(clock)
    good = _innocents(clock)
    for r in good[:3]:
        s.add_request(r)
    hostile_ids = set()
    for i, md in enumerate(metas):  # the front door: refused, or accepted when in range
        rid = f"bad{i}"
        try:
            s.add_request(Request(rid, [1, 2, 3, 4 + i], 4, clock(), metadata=md))
            hostile_ids.add(rid)
        except RequestRejected as exc:
            assert exc.status == 400 and exc.param
    for j, (name, value) in enumerate(poisons):  # behind validation's back
        m = AgentMetadata(agent_type="victim", depth=1)
        object.__setattr__(m, name, value)
        rid = f"poisoned{j}"
        s.add_request(Request(rid, [9, 8, 7, j], 4, clock(), metadata=m))
        hostile_ids.add(rid)
    for r in good[3:]:
        s.add_request(r)
    faults = []
    for step in range(5000):
        if step == 3:  # events while requests are in flight, then again once all are done
            for ev in events:
                assert s.lifecycle_event(ev)[0].http_status < 500
        if not s.has_work and s.copies.in_flight == 0:
            break
        sim_step(s, ex)
        faults += [f.request_id for _, f in s.faults.pop()]
        pool.check_integrity()
        host.check_integrity()
    for ev in events + [{"event": "stall_started", "lifecycle_id": r.request_id} for r in good]:
        assert s.lifecycle_event(ev)[0].http_status < 500
    for _ in range(20):
        sim_step(s, ex)
        pool.check_integrity()
        host.check_integrity()
    assert set(faults) <= hostile_ids
    for r in good:
        assert r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 8


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(metas=st.lists(hostile_metadata, min_size=1, max_size=3),
       poisons=st.lists(poison, min_size=1, max_size=2))  # fmt: skip
def test_real_engine_contains_any_hostile_input(make_engine, metas, poisons):
    engine = make_engine(policy="tokencake")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    good = [engine.add_request(f"innocent {i}", params, metadata={"agent_type": f"t{i % 2}"})
            for i in range(4)]  # fmt: skip
    hostile = set()
    for md in metas:
        with contextlib.suppress(RequestRejected):
            hostile.add(engine.add_request("hostile", params, metadata=md))
    for name, value in poisons:
        m = AgentMetadata(agent_type="victim")
        object.__setattr__(m, name, value)
        hostile.add(engine.add_request("poisoned", params, metadata=m))
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        engine.pool.check_integrity()
    for rid in good:
        assert outs[rid].error is None and len(outs[rid].token_ids) == 4
    assert {rid for rid, o in outs.items() if o.error is not None} <= hostile
    assert engine.pool.num_used == 0


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(md=hostile_metadata, ev=hostile_event, temperature=nasty_number)
def test_http_never_5xx_and_innocent_stream_survives(served, md, ev, temperature):
    server, engine = served
    md = {"lifecycle_id": "tc-" + uuid.uuid4().hex, **md}
    done = {}

    def innocent():
        body = {"model": MODEL, "prompt": "steady", "max_tokens": 6, "ignore_eos": True,
                "stream": True, "tokencake": {"lifecycle_id": "tc-" + uuid.uuid4().hex,
                                              "agent_type": "t0"}}  # fmt: skip
        with stream(server.url + "/v1/completions", body, timeout=600) as (status, lines):
            done["lines"] = (status, list(lines))

    t = threading.Thread(target=innocent)
    t.start()
    for body in (
        {"model": MODEL, "prompt": "hi", "max_tokens": 2, "tokencake": md},
        {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": temperature},
    ):
        raw = json.dumps(body).encode()  # NaN / Infinity literals: Python's json accepts them
        r = request("POST", server.url + "/v1/completions", content=raw)
        assert r.status_code < 500, r.text[:300]
    r = post(server.url + "/v1/tokencake/events", ev)
    assert r.status_code < 500, r.text[:300]
    t.join(600)
    status, lines = done["lines"]
    assert status == 200 and lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
    wait_pool_idle(server, engine)
