"""Tool calling without a model: request parsing, prompt rendering, output parsing (streamed and
whole), and forced calls."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import tool_templates as T
from tokencake.fieldpolicy import InvalidField
from tokencake.models.tokenizer import Tokenizer
from tokencake.toolcall import (
    ArgsDelta,
    CallEnd,
    CallStart,
    InvalidToolRequest,
    TextDelta,
    ToolCallParser,
    ToolChoice,
    parse_tool_calls,
    parse_tool_request,
    render_prompt,
    response_format_spec,
    template_info,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_def", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21C"},
    {"role": "tool", "tool_call_id": "call_def", "content": "12:00"},
]


def tokenizer(template: str) -> Tokenizer:
    tok = Tokenizer.byte_level_for_tests()
    tok.hf.chat_template = template
    return tok


# ---------------------------------------------------------------- request parsing
def test_request_parsing_and_history():
    req = parse_tool_request(HISTORY, [WEATHER, CLOCK], "auto", False)
    assert [t.name for t in req.tools] == ["get_weather", "now"]
    assert req.choice == ToolChoice("auto") and req.parallel is False
    assert req.messages[2].content == "" and len(req.messages[2].tool_calls) == 2
    assert req.call_ids == ("call_abc", "call_def")
    assert req.result_ids == ("call_abc", "call_def")
    assert req.history.calls == {"call_abc": "get_weather", "call_def": "now"}
    assert req.history.returning and req.history.pending == ()
    # the same conversation before the results: the calls are pending
    half = parse_tool_request(HISTORY[:3], [WEATHER, CLOCK])
    assert half.history.pending == ("call_abc", "call_def") and not half.history.returning
    assert parse_tool_request(HISTORY[:2], [WEATHER]).choice.mode == "auto"
    assert parse_tool_request(HISTORY[:2]).choice.mode == "none"
    named = parse_tool_request(
        HISTORY[:2], [WEATHER], {"type": "function", "function": {"name": "get_weather"}}
    )
    assert named.choice == ToolChoice("function", "get_weather")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]},
            "tools[0].function.x",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tool_fields_name_the_field(kwargs, param):
    with pytest.raises(InvalidToolRequest) as e:
        parse_tool_request(HISTORY[:2], **kwargs)
    assert e.value.param == param


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "tool", "tool_call_id": "call_x", "content": "1"}], "messages[0].tool_call_id"),
        ([{"role": "tool", "content": "1"}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 3}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(InvalidToolRequest) as e:
        parse_tool_request(messages)
    assert e.value.param == param


# ---------------------------------------------------------------- rendering
def test_template_capabilities():
    assert template_info(T.HERMES).supports_tools and template_info(T.HERMES).format == "hermes"
    assert template_info(T.LLAMA3_JSON).format == "llama3_json"
    mistral = template_info(T.MISTRAL)
    assert mistral.format == "mistral" and mistral.id_style == "mistral"
    assert not template_info(T.CHATML_NO_TOOLS).supports_tools
    assert template_info(T.CHATML_NO_TOOLS).format == "hermes"


def test_native_hermes_template_renders_tools_calls_and_results():
    req = parse_tool_request(HISTORY, [WEATHER, CLOCK])
    text, info = render_prompt(tokenizer(T.HERMES), list(req.messages), req.tools, req.choice)
    assert info.supports_tools
    assert json.dumps(WEATHER["function"]["parameters"]) in text  # the schema reached the template
    # arguments were handed over as an object (tojson re-serialises it, no double encoding)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # tool_choice none leaves the tools out of the prompt but keeps the history
    none, _ = render_prompt(tokenizer(T.HERMES), list(req.messages), req.tools, ToolChoice("none"))
    assert "# Tools" not in none and "sunny, 21C" in none


def test_native_llama3_template():
    req = parse_tool_request(HISTORY[:3], [WEATHER, CLOCK])
    text, info = render_prompt(tokenizer(T.LLAMA3_JSON), list(req.messages), req.tools, req.choice)
    assert info.format == "llama3_json"
    assert '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}' in text


def test_native_mistral_template_gets_nine_character_ids():
    req = parse_tool_request(HISTORY[1:], [WEATHER, CLOCK])
    text, _ = render_prompt(tokenizer(T.MISTRAL), list(req.messages), req.tools, req.choice)
    ids = [
        json.loads("{" + part.split("{", 1)[1].rsplit("}", 1)[0] + "}")["call_id"]
        for part in text.split("[TOOL_RESULTS]")[1:]
    ]
    assert len(ids) == 2 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert ids[0] != ids[1]
    again, _ = render_prompt(tokenizer(T.MISTRAL), list(req.messages), req.tools, req.choice)
    assert again == text  # stable ids keep the prompt (and its prefix cache) stable


def test_fallback_prompt_for_template_without_tools():
    req = parse_tool_request(HISTORY, [WEATHER, CLOCK], "required")
    text, info = render_prompt(
        tokenizer(T.CHATML_NO_TOOLS), list(req.messages), req.tools, req.choice
    )
    assert not info.supports_tools and info.format == "hermes"
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")  # appended to the client's
    assert '"name": "get_weather"' in system and "<tool_call>" in system
    assert "You must call at least one function now." in system
    # earlier calls written as Hermes blocks in the assistant turn, results merged in one user turn
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in text
    )
    assert (
        "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response>\n<tool_response>\n12:00\n</tool_response><|im_end|>"
        in text
    )
    assert "<|im_start|>tool" not in text
    # no system message: one is inserted
    plain = parse_tool_request(HISTORY[1:2], [WEATHER])
    text, _ = render_prompt(
        tokenizer(T.CHATML_NO_TOOLS), list(plain.messages), plain.tools, plain.choice
    )
    assert text.startswith("<|im_start|>system\nYou can call functions")


def test_plain_conversation_renders_as_before():
    tok = tokenizer(T.CHATML_NO_TOOLS)
    msgs = [{"role": "user", "content": "hi"}]
    req = parse_tool_request(msgs)
    assert render_prompt(tok, list(req.messages))[0] == tok.render_chat(msgs)


# ---------------------------------------------------------------- output parsing
CASES = [
    # (format, text, expected content, expected [(name, args)])
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"arguments": {"city": "Oslo", "days": 2}, "name": "get_weather"}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
        "Let me look.",
        [("get_weather", {"city": "Oslo", "days": 2}), ("now", {})],
    ),
    (
        "hermes",
        "Just text, with a < and <tool but no call.",
        "Just text, with a < and <tool but no call.",
        [],
    ),
    (
        "hermes",
        '{"name": "get_weather", "arguments": {"city": "Rome"}}',
        None,
        [("get_weather", {"city": "Rome"})],
    ),
    (
        "hermes",
        '{"name": "unknown_fn", "arguments": {}}',
        '{"name": "unknown_fn", "arguments": {}}',
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "now", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>',
        None,
        [("now", {"tz": "UTC"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "}{"}}, {"name": "now", "arguments": {}}]',
        None,
        [("get_weather", {"city": "}{"}), ("now", {})],
    ),
    ("mistral", "No tools needed.", "No tools needed.", []),
    (
        "mistral",
        ' [{"name": "now", "arguments": {}}]',
        None,
        [("now", {})],
    ),  # [TOOL_CALLS] stripped
    ("mistral", "[see] the docs", "[see] the docs", []),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}',
        None,
        [("get_weather", {"city": "Lima"})],
    ),
    (
        "llama3_json",
        '{"name": "now", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Quito"}}',
        None,
        [("now", {}), ("get_weather", {"city": "Quito"})],
    ),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
]
NAMES = ("get_weather", "now")


def collect(events):
    text, calls, ends = "", {}, []
    for e in events:
        if isinstance(e, TextDelta):
            text += e.text
        elif isinstance(e, CallStart):
            assert e.index not in calls and e.index == len(calls)
            calls[e.index] = [e.id, e.name, ""]
        elif isinstance(e, ArgsDelta):
            calls[e.index][2] += e.text
        elif isinstance(e, CallEnd):
            ends.append(e.index)
    return text, calls, ends


@pytest.mark.parametrize("fmt, text, content, expected", CASES)
def test_parse_whole_output(fmt, text, content, expected):
    out = parse_tool_calls(text, fmt, NAMES)
    assert out.content == content
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == expected
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in out.tool_calls)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("fmt, text, content, expected", CASES)
def test_streaming_matches_whole_parse_for_any_split(fmt, text, content, expected, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    p = ToolCallParser(fmt, NAMES)
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    streamed_text, calls, ends = collect(events)
    assert streamed_text == (content or "")
    assert [(n, json.loads(a)) for _, n, a in calls.values()] == expected
    assert ends == list(range(len(expected)))
    assert [(c.name, c.arguments) for c in p.calls] == [(n, a) for _, n, a in calls.values()]


def test_text_is_released_as_soon_as_it_cannot_start_a_call():
    p = ToolCallParser("hermes", NAMES)
    assert collect(p.feed("Hello <tool"))[0] == "Hello"  # "<tool" might open a tag; " " trails
    assert collect(p.feed("box> ok"))[0] == " <toolbox> ok"
    events = p.feed("<tool_call>") + p.feed('{"name": "now", "argu')
    assert [type(e) for e in events] == [CallStart]
    assert p.feed('ments": {"a": 1') == [ArgsDelta(0, '{"a": 1')]  # one delta per feed
    assert not p.calls  # not finished yet


def test_truncated_call_is_malformed_and_whole_parse_keeps_text():
    text = '<tool_call>{"name": "now", "arguments": {"a": 1'
    p = ToolCallParser("hermes", NAMES)
    events = p.feed(text) + p.finish()
    assert p.malformed and not p.calls and isinstance(events[-1], CallEnd)
    assert parse_tool_calls(text, "hermes", NAMES).content == text
    # a complete call before the cut-off one stands; the fragment is dropped
    two = '<tool_call>{"name": "now", "arguments": {}}</tool_call>\n' + text
    out = parse_tool_calls(two, "hermes", NAMES)
    assert out.content is None and [(c.name, c.arguments) for c in out.tool_calls] == [
        ("now", "{}")
    ]


def test_mistral_ids():
    out = parse_tool_calls(
        '[TOOL_CALLS] [{"name": "now", "arguments": {}}]', "mistral", NAMES, "mistral"
    )
    assert len(out.tool_calls[0].id) == 9 and out.tool_calls[0].id.isalnum()


# ---------------------------------------------------------------- forced calls
def test_forced_calls_use_the_hermes_grammar_and_parser():
    structured = pytest.importorskip("tokencake.structured")
    named = parse_tool_request(
        HISTORY[:2],
        [WEATHER, CLOCK],
        {"type": "function", "function": {"name": "get_weather"}},
        constrained=True,
    )
    g = named.grammar()
    assert isinstance(g, structured.ToolCallGrammar) and [t.name for t in g.tools] == [
        "get_weather"
    ]
    assert not g.parallel
    req = parse_tool_request(HISTORY[:2], [WEATHER, CLOCK], "required", True, constrained=True)
    g = req.grammar()
    assert [t.name for t in g.tools] == ["get_weather", "now"] and g.parallel
    assert parse_tool_request(HISTORY[:2], [WEATHER], "auto", constrained=True).grammar() is None
    # whatever the model's format, forced output is read as Hermes blocks
    p = req.output_parser(template_info(T.MISTRAL))
    text = g.begin + json.dumps({"name": "now", "arguments": {}}) + g.end
    events = p.feed(text) + p.finish()
    assert [(n, a) for _, n, a in collect(events)[1].values()] == [("now", "{}")]
    assert len(p.calls[0].id) == 9  # the Mistral template's id style still applies


def test_response_format_specs():
    structured = pytest.importorskip("tokencake.structured")
    assert response_format_spec(None) is None and response_format_spec({"type": "text"}) is None
    assert isinstance(response_format_spec({"type": "json_object"}), structured.JsonObject)
    spec = response_format_spec(
        {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
        }
    )
    assert isinstance(spec, structured.JsonSchema) and spec.strict
    for bad, param in [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"schema": 3}},
            "response_format.json_schema.schema",
        ),
    ]:
        with pytest.raises(InvalidField) as e:
            response_format_spec(bad)
        assert e.value.param == param
