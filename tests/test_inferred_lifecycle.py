"""Tool-call lifecycles inferred from the OpenAI tool-calling protocol (issue 14).

Unit level (a fake clock): a response's tool calls start the stall, the matching ``tool``
results end it, durations are learned per function name and agent identity, explicit events win,
a conversation that never returns expires, the pending-call index is bounded, a lifecycle id is
reusable once its request ended and a 409 only while it is still generating.

End to end (tiny model, ``tokencake`` policy with a host tier, the real ``openai`` client, no
hints and no events): the forced call ends in ``tool_calls``, the Time Scheduler keeps or
offloads the conversation's KV during the tool, and the return is a prefix hit
(``usage.prompt_tokens_details.cached_tokens`` and the engine's counters); annotated and
unannotated conversations mixed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from typing import Literal

import openai
import pytest

from tests.test_server import ENGINE, MODEL, wait_pool_idle
from tokencake.async_engine import AsyncEngine
from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.inferred import LifecycleTicket, ToolCallIndex, call_kind
from tokencake.scheduler.lifecycle import Disposition, Lifecycle, LifecycleState
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.time_sched import PState
from tokencake.server import BackgroundServer, openapi_spec
from tokencake.server.lifecycles import HEADER

INFERRED = AgentMetadata(agent_name="user:alice", offload_eligible=True, reusable_prefix=True)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _lc() -> tuple[Lifecycle, ToolCallIndex, Clock]:
    clock = Clock()
    lc = Lifecycle(clock)
    return lc, ToolCallIndex(lc), clock


def _call(lc: Lifecycle, idx: ToolCallIndex, key: str, handle: str, calls) -> None:
    lc.associate(key, INFERRED, handle=handle)
    lc.generation_finished(key, snapshot=(b"h",))
    assert idx.enter(key, calls)


# ---- the state machine ----------------------------------------------------------------------
def test_tool_calls_start_and_results_finish_the_stall_and_teach_the_predictor():
    lc, idx, clock = _lc()
    _call(lc, idx, "r1", "tc-conv", [("call_a", "search")])
    rec = lc.records["r1"]
    assert (rec.state, rec.source, rec.kind) == (LifecycleState.ACTIVE, "inferred", "search")
    assert rec.predicted == lc.config.default_stall_s  # nothing learned yet
    clock.t += 3.0
    assert idx.resume(["call_unknown", "call_a"]) == "tc-conv"  # the conversation's handle
    assert rec.cause == "finished" and len(idx) == 0
    # Learned for this agent identity and for the function across agents.
    assert lc.predictor.predict("", "user:alice", "search", None) == 3.0
    assert lc.predictor.predict("", "user:bob", "search", None) == 3.0
    # The return reuses the conversation's id; the next call predicts 3 s for "search".
    _call(lc, idx, "r2", "tc-conv", [("call_b", "search")])
    assert lc.records["r2"].predicted == 3.0 and lc.resolve("tc-conv") == "r2"
    assert idx.resume(["call_nobody_made"]) is None
    assert idx.counters == {"inferred_calls": 2, "inferred_returns": 1, "unmatched_returns": 1}


def test_parallel_calls_are_one_stall_of_their_combined_kind():
    lc, idx, _ = _lc()
    _call(lc, idx, "r1", "h", [("c1", "search"), ("c2", "fetch"), ("c3", "search")])
    assert lc.records["r1"].kind == call_kind(["search", "fetch"]) == "fetch+search"
    assert idx.resume(["c2"]) == "h" and lc.records["r1"].cause == "finished"
    assert len(idx) == 0  # every call id of the record went with it


def test_explicit_events_win():
    lc, idx, clock = _lc()
    _call(lc, idx, "r1", "tc-x", [("c1", "search")])
    started = lc.records["r1"].started_at
    # An explicit start (by the handle) replaces the inferred kind and estimate, not the start.
    assert lc.stall_started("tc-x", "web", 30.0) is Disposition.APPLIED
    rec = lc.records["r1"]
    assert (rec.source, rec.kind, rec.estimate, rec.started_at) == (
        "explicit",
        "web",
        30.0,
        started,
    )
    assert rec.predicted == 30.0
    # An explicit finish first: the inferred return finds nothing left to end.
    clock.t += 1.0
    assert lc.stall_finished("tc-x") is Disposition.APPLIED
    assert idx.resume(["c1"]) is None and rec.cause == "finished"
    # An explicit start before the response: the protocol does not restart it.
    lc.associate("r2", INFERRED, handle="tc-y")
    assert lc.stall_started("tc-y", "db", 5.0) is Disposition.APPLIED
    lc.generation_finished("r2", snapshot=(b"h",))
    assert idx.enter("r2", [("c2", "search")])
    assert (lc.records["r2"].kind, lc.records["r2"].source) == ("db", "explicit")


def test_a_conversation_that_never_returns_expires():
    lc, idx, clock = _lc()
    _call(lc, idx, "r1", "h", [("c1", "slow_tool")])
    rec = lc.records["r1"]
    clock.t = rec.safety_deadline + 0.001
    lc.expire()
    assert rec.cause == "expired" and len(idx) == 0
    assert idx.resume(["c1"]) is None  # a late return is a new conversation
    clock.t += lc.config.tombstone_seconds + 1
    lc.expire()
    assert not lc.records and not lc.handles  # the tombstone and its handle are gone


def test_pending_calls_are_bounded_by_count_and_bytes():
    lc = Lifecycle(Clock())
    idx = ToolCallIndex(lc, max_entries=8)
    for i in range(20):
        _call(lc, idx, f"r{i}", f"h{i}", [(f"call_{i}_{j}", "t") for j in range(3)])
    assert len(idx) == 8
    small = ToolCallIndex(Lifecycle(Clock()), max_bytes=4096)
    for i in range(20):
        _call(small.lifecycle, small, f"r{i}", f"h{i}", [(f"call_{i}", "t")])
    assert small.calls.nbytes <= 4096 and len(small) < 20


def test_lifecycle_id_is_reusable_once_its_request_ended():
    lc, idx, _ = _lc()
    lc.associate("r1", INFERRED, handle="tc-a")
    with pytest.raises(RequestRejected) as exc:  # still generating: a concurrent reuse
        lc.associate("r2", INFERRED, handle="tc-a")
    assert exc.value.status == 409
    lc.generation_finished("r1", snapshot=(b"h",))
    lc.associate("r2", INFERRED, handle="tc-a")  # awaiting a start: superseded
    assert lc.records["r1"].cause == "superseded" and lc.resolve("tc-a") == "r2"
    # Events address the current record through the handle.
    lc.generation_finished("r2")
    assert lc.handle({"event": "stall_started", "lifecycle_id": "tc-a"})[1]["state"] == "active"
    lc.associate("r3", INFERRED, handle="tc-a")  # a stall open: the agent is back, it finished
    assert lc.records["r2"].cause == "finished"


def test_no_tool_call_ends_an_inferred_lifecycle():
    lc, idx, _ = _lc()
    lc.associate("r1", INFERRED, handle="h")
    lc.generation_finished("r1", snapshot=(b"h",))
    idx.close("r1")
    assert lc.records["r1"].cause == "no_tool_call"


# ---- end to end over HTTP ---------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        # An enum keeps the random model's forced arguments short.
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SYSTEM = "Weather agent."


@pytest.fixture(scope="module")
def tc_served(tiny_model):
    cfg, params, tok = tiny_model
    # The fallback tool prompt is ~700 bytes (a byte-level tokenizer): room past 512 positions.
    cfg = dataclasses.replace(cfg, max_position_embeddings=2048)
    engine = AsyncEngine(
        LLMEngine(
            EngineConfig(
                **{**ENGINE, "max_model_len": 1024, "num_pages": 192},
                policy="tokencake",
                host_kv_gib=0.01,
            ),  # fmt: skip
            model_config=cfg,
            params=params,
            tokenizer=tok,
        )
    )
    server = BackgroundServer(engine)
    yield server, engine
    server.stop()
    engine.shutdown()


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _engine_view(server, engine, key: str):
    def read(e):
        ts = e.scheduler.policy.time
        rec = e.scheduler.lifecycle.records.get(key)
        p = ts.items.get(key)
        return (
            None if rec is None else (rec.state.value, rec.source, rec.kind, rec.cause),
            None if p is None else p.state,
            dict(e.scheduler.tool_calls.counters),
        )

    return server.run(engine.call(read))


def _conversation(client, server, engine, extra_body=None, user=None):
    """One agent turn with a tool call and its return; returns what the assertions need."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Paris?"},
    ]
    kw = dict(model=MODEL, tools=[WEATHER], max_tokens=150, temperature=0.0)
    kw["parallel_tool_calls"] = False  # one forced call, then the grammar ends the output
    if user is not None:
        kw["user"] = user
    raw = client.chat.completions.with_raw_response.create(
        messages=messages, tool_choice="required", extra_body=extra_body, **kw
    )
    first = raw.parse()
    handle = raw.headers[HEADER]
    documented = openapi_spec(MODEL)["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert re.fullmatch(documented["headers"][HEADER]["schema"]["pattern"], handle)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert first.model_extra["tokencake"]["lifecycle_id"] == handle
    key = first.id
    # The stall started when the response ended; the Time Scheduler decides at once.
    _wait(lambda: _engine_view(server, engine, key)[1] in (PState.KEPT, PState.OFFLOADED,
                                                           PState.OFFLOADING))  # fmt: skip
    state, pstate, _ = _engine_view(server, engine, key)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18})},
    ]
    # "required" again: the fallback prompt (the tiny model has no tool template) words the
    # tool instructions by tool_choice, and the return's prompt should start with the first's.
    raw2 = client.chat.completions.with_raw_response.create(
        messages=messages, tool_choice="required", extra_body=extra_body, **kw
    )
    second = raw2.parse()
    return first, second, handle, raw2.headers[HEADER], state, pstate, key


def test_openai_client_tool_conversation_keeps_kv_and_hits_it_on_return(tc_served):
    server, engine = tc_served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    first, second, h1, h2, state, pstate, key = _conversation(client, server, engine)
    # (released: the predicted return is near, the upload may begin)
    assert state[0] in ("active", "released") and state[1:3] == ("inferred", "get_weather")
    assert pstate in (PState.KEPT, PState.OFFLOADED, PState.OFFLOADING)
    # The return ended the stall, kept the conversation's id and hit the prefix cache: at least
    # every full block of the first call's prompt.
    assert h2 == h1 and second.model_extra["tokencake"] == {
        "lifecycle_id": h1,
        "source": "inferred",
    }
    rec, _, counters = _engine_view(server, engine, key)
    assert rec is None or rec[3] == "finished"
    assert counters.get("inferred_returns", 0) >= 1
    bs = ENGINE.get("page_size", 16)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens // bs * bs > 0, (cached, first.usage)
    counters = server.run(engine.call(lambda e: dict(e.scheduler.policy.time.counters)))
    assert counters.get("action_keep", 0) + counters.get("action_offload", 0) >= 1
    wait_pool_idle(server, engine)


def test_mixed_annotated_and_unannotated_traffic(tc_served):
    server, engine = tc_served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    # Hints without events (the static extra_body of an agent framework): the protocol supplies
    # the start and the end, the hints the identity; the same id works for every call.
    hints = {"tokencake": {"lifecycle_id": "tc-" + "1" * 12 + "4" + "2" * 3 + "8" + "3" * 15,
                           "agent_type": "forecaster", "offload_eligible": True,
                           "reusable_prefix": True}}  # fmt: skip
    lid = hints["tokencake"]["lifecycle_id"]
    a1, a2, ha1, ha2, state, _, _ = _conversation(client, server, engine, extra_body=hints)
    assert ha1 == ha2 == lid and a1.model_extra["tokencake"]["source"] == "annotated"
    # The hinted record, its stall inferred.
    assert state[0] in ("active", "released") and state[1:3] == ("inferred", "get_weather")
    # An unannotated conversation with a `user` alongside.
    u1, u2, hu1, hu2, _, _, _ = _conversation(client, server, engine, user="bob")
    assert hu1 == hu2 != lid and u1.model_extra["tokencake"]["source"] == "inferred"
    for second in (a2, u2):
        assert second.usage.prompt_tokens_details.cached_tokens > 0
    # Learned per agent: the hinted type and the inferred identity, for the same function.
    pred = server.run(engine.call(lambda e: e.scheduler.lifecycle.predictor))
    assert pred.history(("type", "forecaster", "get_weather")) is not None
    # (the inferred identity stands for the agent type: agents of one kind share instructions)
    assert pred.history(("type", "user:bob", "get_weather")) is not None
    hints = server.run(engine.call(lambda e: e.scheduler.tool_calls.hints(hu1, "user:bob")))
    assert hints.depth == 3 and hints.agent_type == "user:bob"  # the conversation's 3rd call
    # A plain chat request without tools opens no lifecycle and carries no lifecycle field.
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert "tokencake" not in (plain.model_extra or {})
    wait_pool_idle(server, engine)


def test_streamed_tool_call_and_never_returning_conversation_expires(tc_served):
    server, engine = tc_served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Rome?"}],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=150,
            parallel_tool_calls=False,
            stream=True,
        )
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    key = chunks[0].id
    assert chunks[0].model_extra["tokencake"]["source"] == "inferred"
    _wait(lambda: (_engine_view(server, engine, key)[0] or ("",))[0] in ("active", "released"))
    # Nobody returns: past the safety deadline the lifecycle expires and releases its KV.
    lc = server.run(engine.call(lambda e: e.scheduler.lifecycle))
    real = lc.clock
    try:
        deadline = server.run(engine.call(lambda e: lc.records[key].safety_deadline))
        lc.clock = lambda: real() + (deadline - real()) + 1.0
        server.run(engine.call(lambda e: lc.expire()))
        rec, pstate, _ = _engine_view(server, engine, key)
        assert rec[3] == "expired"
    finally:
        lc.clock = real
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)  # the engine ticks
    _wait(lambda: _engine_view(server, engine, key)[1] is None)  # the tick dropped its KV hold
    wait_pool_idle(server, engine)


def test_ticket_keeps_unannotated_requests_ordinary(make_engine):
    """An inferred lifecycle leaves the request unannotated for the Space Scheduler."""
    engine = make_engine(policy="tokencake")
    ticket = LifecycleTicket("tc-z", INFERRED, None)
    rid = engine.add_request("hello there", SamplingParams(max_tokens=4), "r-1", ticket)
    assert engine.scheduler.requests[rid].metadata is None
    assert engine.scheduler.lifecycle.records[rid].handle == "tc-z"
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.lifecycle.records[rid].state is LifecycleState.AWAITING_START
    assert engine.scheduler.tool_calls.enter(rid, [("call_1", "t")])


def test_agents_sdk_run_gets_its_tool_call_inferred(tc_served):
    """The OpenAI Agents SDK, unchanged (no hints, no events): its function-tool loop's first
    response is a forced call, the SDK runs the tool and sends the result back; the server
    ends that conversation's stall on the return and the return hits the cached prefix."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    server, engine = tc_served
    agents.set_tracing_disabled(True)
    ran: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Weather in a city."""
        ran.append(city)
        return "sunny"

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Weather agent.",
        tools=[get_weather],
        model=agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        # required once (the SDK resets tool_choice after a call): then free text ends the run
        model_settings=agents.ModelSettings(
            tool_choice="required", parallel_tool_calls=False, max_tokens=96, temperature=0.0
        ),
    )
    before = _engine_view(server, engine, "")[2].get("inferred_returns", 0)
    hits0 = server.run(engine.call(lambda e: e.pool.hits))
    result = asyncio.run(agents.Runner.run(agent, "Paris?", max_turns=3))
    assert len(ran) == 1 and result.final_output is not None
    after = _engine_view(server, engine, "")[2].get("inferred_returns", 0)
    assert after == before + 1  # the SDK's second request was recognised as the tool's return
    assert server.run(engine.call(lambda e: e.pool.hits)) > hits0  # ... and hit the prefix
    wait_pool_idle(server, engine)
