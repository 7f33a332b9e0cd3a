"""Constrained decoding: on the tiny random-weight model (which emits garbage unconstrained),
every finished output is valid against its schema, so validity shows the constraint works."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokencake.sampling_params import SamplingParams
from tokencake.structured import (
    GrammarError,
    JsonObject,
    JsonSchema,
    LarkGrammar,
    ToolCallGrammar,
    ToolSpec,
)

NAMES = ("a", "bb", "id", "x_1", "tag")

# Bounded leaves: every schema in the family has a bounded longest valid output, so a
# request that does not stop within max_tokens points at a broken constraint.
leaves = st.one_of(
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-99, 99),
        st.integers(0, 900),
    ),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 3)),
    st.just({"type": "string", "pattern": "^[a-z]{1,3}$"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(
        st.sampled_from(["red", "green", 7, None, True]), min_size=1, max_size=3, unique=True
    ).map(lambda vals: {"enum": vals}),
)


def arrays(inner):
    return st.builds(
        lambda item, hi: {"type": "array", "items": item, "maxItems": hi},
        inner,
        st.integers(0, 2),
    )


def objects(inner, max_props: int):
    def build(props, required_mask):
        names = list(props)
        return {
            "type": "object",
            "properties": props,
            "required": [n for n, r in zip(names, required_mask, strict=False) if r],
            "additionalProperties": False,
        }

    return st.builds(
        build,
        st.dictionaries(st.sampled_from(NAMES), inner, min_size=1, max_size=max_props),
        st.lists(st.booleans(), min_size=max_props, max_size=max_props),
    )


values = st.one_of(leaves, arrays(leaves), objects(leaves, 2))
schemas = st.one_of(objects(values, 3), st.builds(lambda a, b: {"anyOf": [a, b]}, leaves, leaves))


def run_all(engine, requests):
    """Submit ``(prompt, params)`` pairs together; return the finished outputs in order."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i] for i in ids]


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(schemas, min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_outputs_valid_against_schema(make_engine, batch, seed):
    engine = make_engine()
    reqs = [
        (
            "Give me JSON",
            SamplingParams(
                max_tokens=200,
                temperature=1.0 if i % 2 == 0 else 0.0,
                seed=seed + i,
                structured=JsonSchema(schema),
            ),
        )  # fmt: skip
        for i, schema in enumerate(batch)
    ]
    # Plain rows in the same batch must stay unconstrained.
    reqs.append(("Give me JSON", SamplingParams(max_tokens=8, temperature=1.0, seed=seed)))
    outs = run_all(engine, reqs)
    for schema, out in zip(batch, outs, strict=False):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_and_unconstrained_neighbour(make_engine):
    engine = make_engine()
    outs = run_all(
        engine,
        [
            ("{", SamplingParams(max_tokens=200, temperature=0.8, seed=s, structured=JsonObject()))
            for s in range(3)
        ]
        + [("{", SamplingParams(max_tokens=200))],
    )
    stopped = [o for o in outs[:3] if o.finish_reason == "stop"]
    assert stopped, [o.text for o in outs]
    for o in stopped:
        assert isinstance(json.loads(o.text), dict)
    with pytest.raises(json.JSONDecodeError):
        json.loads(outs[3].text)  # garbage without the constraint: the constraint did the work


WEATHER = ToolSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 4}, "days": {"enum": [1, 3]}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
)
SEARCH = ToolSpec(
    "search",
    {
        "type": "object",
        "properties": {"q": {"type": "string", "maxLength": 3}},
        "required": ["q"],
        "additionalProperties": False,
    },
)


def parse_calls(text: str, g: ToolCallGrammar) -> list[dict]:
    calls = []
    for chunk in text.split(g.end + g.separator + g.begin) if g.parallel else [text]:
        chunk = chunk.removeprefix(g.begin).removesuffix(g.end)
        calls.append(json.loads(chunk))
    return calls


@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_grammar_forces_valid_calls(make_engine, parallel):
    engine = make_engine()
    g = ToolCallGrammar((WEATHER, SEARCH), parallel=parallel)
    named = ToolCallGrammar((SEARCH,))
    outs = run_all(
        engine,
        [("call a tool", SamplingParams(max_tokens=150, temperature=1.0, seed=s, structured=g))
         for s in range(3)]
        + [("call a tool", SamplingParams(max_tokens=150, structured=named))],
    )  # fmt: skip
    tools = {t.name: json.loads(t.parameters) for t in (WEATHER, SEARCH)}
    for out, grammar in zip(outs, [g, g, g, named], strict=True):
        text = out.text
        if grammar.parallel and out.finish_reason == "length":
            # Any number of calls is allowed, so a garbage model may run out of tokens: the
            # calls it completed must still be valid.
            text = text[: text.rindex(g.end) + len(g.end)]
        else:
            assert out.finish_reason == "stop", out.text
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        for call in parse_calls(text, grammar):
            assert set(call) == {"name", "arguments"}
            assert call["name"] in {t.name for t in grammar.tools}
            jsonschema.validate(call["arguments"], tools[call["name"]])


def test_lark_grammar(make_engine):
    engine = make_engine()
    (out,) = run_all(
        engine,
        [("x", SamplingParams(max_tokens=20, temperature=1.0, seed=2,
                              structured=LarkGrammar('start: ("yes" | "no") "!"')))],
    )  # fmt: skip
    assert out.finish_reason == "stop" and out.text in ("yes!", "no!")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (lambda: JsonSchema({"type": "bogus"}), "bogus"),
        (lambda: JsonSchema("{not json"), "not valid JSON"),
        (lambda: JsonSchema(["a"]), "must be a JSON object"),
        (lambda: ToolCallGrammar(()), "at least one ToolSpec"),
        (lambda: ToolCallGrammar((SEARCH, SEARCH)), "duplicate tool names"),
        (lambda: LarkGrammar("start: undefined_rule"), "cannot compile"),
    ],
)
def test_bad_specs_are_refused(make_engine, spec, message):
    engine = make_engine()
    with pytest.raises(GrammarError, match=message):
        engine.add_request("x", SamplingParams(structured=spec()))
    assert not engine.has_unfinished_requests()
    assert isinstance(GrammarError("x"), ValueError)  # the server maps ValueError to 400


def test_structured_refuses_ignore_eos():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=JsonObject())


class _BrokenMatcher:
    """Stands in for an llguidance matcher that hit an internal limit mid-generation."""

    def unsafe_compute_mask_ptr(self, ptr: int, size: int) -> None:
        pass

    def is_error(self) -> bool:
        return True

    def get_error(self) -> str:
        return "step lexer fuel exhausted"


def test_failing_matcher_aborts_only_its_request(make_engine):
    engine = make_engine()
    bad = engine.add_request("x", SamplingParams(max_tokens=20, structured=JsonObject()))
    good = engine.add_request("x", SamplingParams(max_tokens=5))
    engine._text[bad].controls.grammar.matcher = _BrokenMatcher()
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs[bad].finish_reason == "abort" and "lexer fuel" in str(outs[bad].error)
    assert outs[bad].token_ids == [2]  # the mask allowed only EOS
    assert outs[good].finish_reason == "length" and outs[good].error is None
    assert engine.pool.num_used == 0
