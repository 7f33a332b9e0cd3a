"""The Responses API translation layer without a model: requests into chat bodies, output and
streaming events checked against the ``openai`` package's own types, the bounded store."""

from __future__ import annotations

import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tokencake.fieldpolicy import InvalidField, UnknownFields
from tokencake.responses_api import (
    ResponseEvents,
    ResponseStore,
    UnknownResponse,
    assistant_message,
    new_response_id,
    output_items,
    parse_responses_request,
    rename_param,
    response_object,
    usage_object,
)
from tokencake.toolcall import (
    ArgsDelta,
    CallEnd,
    CallStart,
    TextDelta,
    ToolCall,
    parse_tool_request,
)

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
EVENTS = TypeAdapter(ResponseStreamEvent)

# What the OpenAI Agents SDK sends on its second turn (after a function call).
SDK_INPUT = [
    {"content": "Weather in Paris?", "role": "user"},
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}],
    },
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}', "id": "fc_1", "status": "completed"},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    {"type": "reasoning", "id": "rs_1", "summary": []},
]  # fmt: skip


def test_input_items_become_a_chat_conversation():
    req = parse_responses_request(
        {"model": "m", "input": SDK_INPUT, "instructions": "Be brief.", "tools": [TOOL], "include": [], "store": False, "max_output_tokens": 20, "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}}},
        ResponseStore(),
    )  # fmt: skip
    body = req.chat_body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    asst = body["messages"][2]
    assert asst["content"] == "Checking." and asst["tool_calls"][0]["id"] == "call_1"
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert len(body["messages"]) == 4  # the reasoning item is dropped
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": TOOL["parameters"]}}]  # fmt: skip
    assert body["tool_choice"] == "auto" and body["max_completion_tokens"] == 20
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}}  # fmt: skip
    assert not req.store and req.history == body["messages"][1:]  # instructions not stored
    # the chat side accepts the translated conversation, and knows the call is answered
    tr = parse_tool_request(body["messages"], body["tools"], body["tool_choice"])
    assert tr.history.returning and tr.history.calls == {"call_1": "get_weather"}
    # errors found on the chat body are reported in Responses terms
    assert rename_param("messages[3].tool_call_id", req) == "input[3].call_id"
    assert rename_param("messages[0].content", req) == "instructions"
    assert rename_param("max_completion_tokens", req) == "max_output_tokens"


def test_unknown_fields_are_all_listed_unless_lenient():
    with pytest.raises(UnknownFields) as e:
        parse_responses_request({"input": "hi", "zeta": 1, "alpha": 2}, ResponseStore())
    assert e.value.fields == ("alpha", "zeta") and "'alpha', 'zeta'" in str(e.value)
    req = parse_responses_request({"input": "hi", "zeta": 1}, ResponseStore(), lenient=True)
    assert req.chat_body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "input"),
        ({"input": 3}, "input"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {"input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}},
            "tool_choice",
        ),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ],
)
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(InvalidField) as e:
        parse_responses_request(body, ResponseStore())
    assert e.value.param == param


def test_previous_response_id_continues_the_stored_conversation():
    store = ResponseStore()
    first = parse_responses_request(
        {"input": "Weather?", "instructions": "sys", "tools": [TOOL]}, store
    )
    call = ToolCall("call_9", "get_weather", '{"city": "Oslo"}')
    store.put("resp_1", first.history + [assistant_message(None, [call])])
    nxt = parse_responses_request(
        {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "rain"}], "previous_response_id": "resp_1", "instructions": "new sys", "tools": [TOOL]},
        store,
    )  # fmt: skip
    msgs = nxt.chat_body["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[0]["content"] == "new sys"  # instructions are not carried over
    assert parse_tool_request(msgs, nxt.chat_body["tools"]).history.returning
    with pytest.raises(UnknownResponse):
        parse_responses_request({"input": "x", "previous_response_id": "resp_gone"}, store)


def test_store_is_bounded_by_count_and_bytes():
    store = ResponseStore(max_responses=3, max_bytes=400)
    msg = [{"role": "user", "content": "x" * 50}]
    for i in range(5):
        assert store.put(f"r{i}", msg)
    assert len(store) == 3 and store.get("r0") is None and store.get("r4") == msg
    store.get("r2")  # recently used: survives the next eviction
    big = [{"role": "user", "content": "y" * 200}]
    store.put("big", big)
    assert store.get("r2") == msg and store.get("r3") is None
    assert store.nbytes <= 400
    assert not store.put("huge", [{"role": "user", "content": "z" * 1000}])
    assert store.get("huge") is None
    got = store.get("big")
    got[0]["content"] = "mutated"
    assert store.get("big") == big  # callers get copies


def test_response_object_matches_openai_types():
    req = parse_responses_request(
        {"input": "hi", "tools": [TOOL], "metadata": {"k": "v"}}, ResponseStore()
    )
    calls = [ToolCall("call_1", "get_weather", '{"city": "Rome"}')]
    obj = response_object(
        new_response_id(),
        "m",
        1.0,
        req.echo,
        output_items("ok", calls),
        "completed",
        usage_object(5, 7, 2),
    )
    r = Response.model_validate(obj)
    assert r.output_text == "ok" and r.output[1].type == "function_call"
    assert r.output[1].arguments == '{"city": "Rome"}' and r.usage.total_tokens == 12
    assert r.metadata == {"k": "v"} and r.tools[0].name == "get_weather"


def test_stream_events_sequence_and_shapes():
    req = parse_responses_request({"input": "hi", "tools": [TOOL]}, ResponseStore())
    ev = ResponseEvents("resp_x", "m", req.echo)
    events = ev.start()
    for e in [
        TextDelta("Let me "),
        TextDelta("check."),
        CallStart(0, "call_a", "get_weather"),
        ArgsDelta(0, '{"city": '),
        ArgsDelta(0, '"Rome"}'),
        CallEnd(0),
    ]:
        events += ev.feed(e)
    events += ev.finish("stop", usage_object(3, 4, 0))
    parsed = [EVENTS.validate_python(e) for e in events]  # every event is a valid OpenAI event
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e.type for e in parsed] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    final = parsed[-1].response
    assert final.output_text == "Let me check." and final.output[1].call_id == "call_a"
    assert json.loads(final.output[1].arguments) == {"city": "Rome"}
    assert parsed[9].output_index == 1 and parsed[12].arguments == '{"city": "Rome"}'
    # a length stop ends with response.incomplete
    ev2 = ResponseEvents("resp_y", "m", req.echo)
    tail = ev2.start() + ev2.feed(TextDelta("abc")) + ev2.finish("length", None)
    last = EVENTS.validate_python(tail[-1])
    assert (
        last.type == "response.incomplete"
        and last.response.incomplete_details.reason == "max_output_tokens"
    )
