"""Tool calling, structured output and the Responses API over HTTP with the real ``openai``
client, on the tiny random model: forced tool choices go through the grammar, so even random
weights produce valid calls, which the server parses (and streams) into OpenAI shapes."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from tests.test_server import post, wait_pool_idle
from tokencake.server import BackgroundServer, openapi_spec

pytest.importorskip("tokencake.structured")

MODEL = "tiny-llama"
PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"type": "string", "enum": ["C", "F"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Paris?"}]
SPEC = openapi_spec(MODEL)


def conforms(body: dict, schema_name: str) -> None:
    """``body`` is valid against the OpenAPI document's declared response schema."""
    registry = Registry().with_resource("urn:spec", Resource(contents=SPEC, specification=DRAFT4))
    OAS30Validator(
        {"$ref": f"urn:spec#/components/schemas/{schema_name}"}, registry=registry
    ).validate(body)


@pytest.fixture(scope="module")
def client(agent_served):
    return openai.OpenAI(base_url=agent_served[0].url + "/v1", api_key="unused", max_retries=0)


def check_call(call, name: str | None = None) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(args, PARAMS)
    return args


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_call_is_parsed(client, seed):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=128, temperature=1.0, seed=seed,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])
    conforms(r.model_dump(exclude_unset=True), "ChatCompletion")


def test_named_tool_call_streams_as_deltas_matching_the_plain_answer(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=128, temperature=0.0)
    named = {"type": "function", "function": {"name": "get_weather"}}
    plain = client.chat.completions.create(**kw, tool_choice=named).choices[0]
    chunks = list(client.chat.completions.create(**kw, tool_choice=named, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) >= 2  # the header, then argument pieces
    head = calls[0]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather"
    assert all(c.id is None and c.function.name is None for c in calls[1:])
    args = "".join(c.function.arguments or "" for c in calls)
    assert args == plain.message.tool_calls[0].function.arguments  # greedy: same call
    check_call(plain.message.tool_calls[0], "get_weather")
    assert not any(d.content for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    for c in chunks:
        conforms(c.model_dump(exclude_unset=True), "ChatCompletionChunk")


def test_parallel_required_calls_and_history_round_trip(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, seed=3,
    )  # fmt: skip
    msg = r.choices[0].message
    assert msg.tool_calls and len({c.id for c in msg.tool_calls}) == len(msg.tool_calls)
    for c in msg.tool_calls:
        check_call(c)
    # send the calls back with their results, as an agent loop does (content null included)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in msg.tool_calls),
    ]  # fmt: skip
    follow = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=8
    )
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens


def test_response_format_json_schema_is_always_valid(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=64, seed=seed, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}},
        )  # fmt: skip
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_tool_choice_none_and_auto_return_text(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=8)  # fmt: skip
        assert r.choices[0].finish_reason in ("stop", "length")
        assert isinstance(r.choices[0].message.content, str)


def test_ecosystem_fields_are_accepted_and_unknown_ones_all_listed(agent_served, client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4, user="u1", metadata={"k": "v"}, store=True,
        reasoning_effort="low", service_tier="auto",
    )  # fmt: skip
    assert r.choices[0].message.content is not None
    bad = post(agent_served[0].url + "/v1/chat/completions", json={"messages": ASK, "zz": 1, "aa": 2, "max_tokens": 2})  # fmt: skip
    err = bad.json()["error"]
    assert bad.status_code == 400 and err["param"] == "aa" and "'aa', 'zz'" in err["message"]
    # --lenient: the same request is served
    server = BackgroundServer(agent_served[1], lenient=True)
    try:
        ok = post(server.url + "/v1/chat/completions", json={"messages": ASK, "zz": 1, "aa": 2, "max_tokens": 2})  # fmt: skip
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()


# ---------------------------------------------------------------- Responses API
RTOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]} for t in TOOLS]  # fmt: skip


def test_responses_function_call_then_previous_response_id(client):
    first = client.responses.create(
        model=MODEL, input="Weather in Paris?", instructions="Use tools.", tools=RTOOLS,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=128,
    )  # fmt: skip
    assert first.status == "completed"
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), PARAMS)
    conforms(first.model_dump(exclude_unset=True), "Response")
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=RTOOLS, max_output_tokens=6,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
    )  # fmt: skip
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens  # the stored turn was prepended
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")


def test_responses_stream_event_sequence(agent_served, client):
    events = list(
        client.responses.create(
            model=MODEL, input="Weather?", tools=RTOOLS, tool_choice="required",
            parallel_tool_calls=False, max_output_tokens=128, stream=True,
        )
    )  # fmt: skip
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == done.arguments and json.loads(done.arguments) is not None
    final = events[-1].response
    assert [o.type for o in final.output] == ["function_call"]
    wait_pool_idle(*agent_served)


# ---------------------------------------------------------------- n > 1 and logit controls
def test_n_choices_plain_streamed_and_with_forced_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=3, max_tokens=5, temperature=1.0, seed=7)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 15  # 3 choices x 5 tokens (no EOS from random weights)
    assert len({c.message.content for c in r.choices}) > 1  # independent samples
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, n=2, max_tokens=5, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}  # fmt: skip
    assert set(finished) == {0, 1} and chunks[-1].usage.completion_tokens == 10
    forced = client.chat.completions.create(
        model=MODEL, messages=ASK, n=2, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=128, temperature=1.0, seed=11,
    )  # fmt: skip
    for c in forced.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        check_call(c.message.tool_calls[0])


def test_logit_bias_and_penalties_reach_the_sampler(client):
    # byte-level tiny tokenizer: id 65 is "A"; a +100 bias makes greedy decoding pick it always
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0.0, logit_bias={"65": 100})  # fmt: skip
    assert r.choices[0].message.content == "A" * 6
    # the other controls are forwarded: bad values are refused by name (engine-side checks too)
    for extra, param in [({"presence_penalty": 3}, "presence_penalty"), ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {"999": 1}}, "logit_bias")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=2, extra_body=extra
            )
        assert e.value.body["param"] == param
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.5, extra_body={"repetition_penalty": 1.2, "min_p": 0.1})  # fmt: skip
    assert ok.choices[0].finish_reason in ("stop", "length")
