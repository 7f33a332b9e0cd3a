"""Property-based fuzzing of the server from its own ``/openapi.json``: bodies drawn from each
operation's request schema, then mutated (wrong types, extra fields, junk); the server must never
answer 5xx, never hang, always answer JSON errors for 4xx, and stay healthy with no leaked blocks."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_server import get, request, wait_pool_idle
from tokencake.server import BackgroundServer, openapi_spec

SPEC = openapi_spec("tiny-llama")
# Keep generations short so each example is quick; the schema allows any max_tokens >= 1.
SMALL_INT = st.integers(min_value=-3, max_value=300) | st.integers(
    min_value=-(2**64), max_value=2**64
)

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
junk = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy for values that (mostly) satisfy an OpenAPI 3.0 schema."""
    schema = _resolve(schema)
    if "enum" in schema:
        s: st.SearchStrategy[Any] = st.sampled_from(schema["enum"])
    elif "oneOf" in schema:
        s = st.one_of(*(from_schema(o, depth + 1) for o in schema["oneOf"]))
    else:
        t = schema.get("type")
        if t == "object":
            props = schema.get("properties", {})
            required = set(schema.get("required", []))
            optional = [k for k in props if k not in required]
            s = st.fixed_dictionaries(
                {k: from_schema(props[k], depth + 1) for k in required},
                optional={k: from_schema(props[k], depth + 1) for k in optional}
                if depth < 2
                else {},
            )
        elif t == "array":
            s = st.lists(
                from_schema(schema.get("items", {}), depth + 1),
                min_size=schema.get("minItems", 0),
                max_size=min(schema.get("maxItems", 4), 4),
            )
        elif t == "string":
            s = st.text(alphabet=string.printable, min_size=schema.get("minLength", 0), max_size=24)
        elif t == "integer":
            lo, hi = schema.get("minimum"), schema.get("maximum")
            s = (
                st.integers(min_value=lo, max_value=hi)
                if hi is not None
                else SMALL_INT.filter(lambda v, lo=lo: lo is None or v >= lo)
            )
        elif t == "number":
            s = st.floats(
                min_value=schema.get("minimum"),
                max_value=schema.get("maximum"),
                allow_nan=False,
                allow_infinity=False,
            )
        elif t == "boolean":
            s = st.booleans()
        else:
            s = junk
    if schema.get("nullable"):
        s = st.none() | s
    return s


@st.composite
def mutated(draw: st.DrawFn, schema: dict[str, Any]) -> Any:
    body = draw(from_schema(schema))
    how = draw(st.sampled_from(["valid", "valid", "extra", "retype", "drop", "junk"]))
    if how == "junk" or not isinstance(body, dict):
        return draw(junk)
    if how == "extra":
        body[draw(st.text(min_size=1, max_size=8))] = draw(junk)
    elif how == "retype" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(junk)
    elif how == "drop" and body:
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


OPERATIONS = [
    (path, op["requestBody"]["content"]["application/json"]["schema"])
    for path, item in SPEC["paths"].items()
    for op in item.values()
    if "requestBody" in op
]


def check(server: BackgroundServer, path: str, body: Any) -> None:
    r = request("POST", server.url + path, content=json.dumps(body).encode(), timeout=30)
    assert r.status_code < 500, (path, body, r.text)
    if r.status_code >= 400:
        err = json.loads(r.text)["error"]
        assert isinstance(err["message"], str) and err["message"]


@pytest.mark.parametrize(("path", "schema"), OPERATIONS, ids=[p for p, _ in OPERATIONS])
def test_fuzz_post_operations(served, path, schema):
    server, engine = served

    @settings(
        max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(body=mutated(schema))
    def run(body: Any) -> None:
        check(server, path, body)

    run()
    assert get(server.url + "/health").json() == {"status": "ok"}
    wait_pool_idle(server, engine)


def test_fuzz_raw_bytes_and_gets(served):
    server, _ = served

    @settings(
        max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(path=st.sampled_from([p for p, _ in OPERATIONS]), raw=st.binary(max_size=64))
    def run(path: str, raw: bytes) -> None:
        r = request("POST", server.url + path, content=raw, timeout=30)
        assert 400 <= r.status_code < 500, r.text

    run()
    for path in SPEC["paths"]:
        r = get(server.url + path)
        assert r.status_code in (200, 405), (path, r.text)
