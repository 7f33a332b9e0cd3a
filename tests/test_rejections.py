"""Typed rejections: raised where the problem is found (engine, scheduler core, metadata,
lifecycle, sampling parameters) and mapped to HTTP in one place, by type, never by message."""

from __future__ import annotations

import uuid

import pytest

from tests.test_server import post, stream, wait_pool_idle
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.lifecycle import Disposition, Lifecycle, LifecycleEvent
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.server.errors import rejection_error


def lid() -> str:
    return "tc-" + uuid.uuid4().hex


def test_rejection_error_translates_the_param_head_only():
    wire = {"prompt": "messages", "max_tokens": "max_completion_tokens", "metadata": "tokencake"}
    cases = [
        (RequestRejected("prompt", "m"), "messages"),
        (RequestRejected("max_tokens", "m"), "max_completion_tokens"),
        (RequestRejected("metadata.depth", "m"), "tokencake.depth"),
        (RequestRejected("temperature", "m"), "temperature"),
        (RequestRejected(None, "m"), None),
    ]
    for exc, param in cases:
        err = rejection_error(exc, wire)
        assert (err.status, err.param, err.message) == (400, param, "m")
    err = rejection_error(RequestRejected("request_id", "x", 409, "duplicate_request_id"), {})
    body = err.body()["error"]
    assert (err.status, body["type"], body["code"]) == (
        409,
        "conflict_error",
        "duplicate_request_id",
    )
    with pytest.raises(ValueError, match="status"):
        RequestRejected("x", "y", 500)


def test_rejections_are_raised_where_found_with_the_param():
    with pytest.raises(RequestRejected) as e:
        AgentMetadata.from_dict({"depth": -1})
    assert e.value.param == "metadata.depth"
    with pytest.raises(RequestRejected) as e:
        AgentMetadata.from_dict({"lifecycle_id": "x"}, strict_lifecycle_id=True)
    assert e.value.param == "metadata.lifecycle_id"
    with pytest.raises(RequestRejected) as e:
        SamplingParams(top_p=0.0)
    assert e.value.param == "top_p"
    with pytest.raises(RequestRejected) as e:
        LifecycleEvent.parse({"event": "stall_started", "lifecycle_id": "a", "kind": ""})
    assert e.value.param == "kind"
    lc = Lifecycle(lambda: 0.0)
    lc.associate("a", AgentMetadata())
    with pytest.raises(RequestRejected) as e:
        lc.associate("a", AgentMetadata())
    assert (e.value.param, e.value.status) == ("metadata.lifecycle_id", 409)
    # The lifecycle's own dict entry point still answers INVALID (in-process callers).
    assert lc.handle({"event": "stall_started", "lifecycle_id": ""})[0] is Disposition.INVALID


def test_a_rejection_raised_in_the_core_keeps_its_param_whatever_its_message(served):
    """Reword the core's refusal: the HTTP answer follows the type and the param, spelled as
    this request spelled it (max_completion_tokens for a chat that used it)."""
    server, engine = served

    def patch(e):
        real = e.scheduler.add_request

        def refuse(request):
            raise RequestRejected("max_tokens", "a brand new wording", 400, "too_long")

        e.scheduler.add_request = refuse
        return real

    real = server.run(engine.call(patch))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}
        r = post(server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err == {
            "message": "a brand new wording",
            "type": "invalid_request_error",
            "param": "max_completion_tokens",
            "code": "too_long",
        }
        r = post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    finally:
        server.run(engine.call(lambda e: setattr(e.scheduler, "add_request", real)))
    wait_pool_idle(server, engine)


def test_concurrently_reused_lifecycle_id_is_a_409_naming_the_metadata_field(served):
    server, engine = served
    i = lid()
    body = {"prompt": "agent", "max_tokens": 2, "tokencake": {"lifecycle_id": i}}
    # Reused once its request has finished: the conversation's next call (issue 14).
    assert post(server.url + "/v1/completions", json=body).status_code == 200
    assert post(server.url + "/v1/completions", json=body).status_code == 200
    # Reused while a request under it is still generating: a 409.
    long = {**body, "prompt": "x" * 40, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with stream(server.url + "/v1/completions", long) as (_, lines):
        next(lines)
        r = post(server.url + "/v1/completions", json=body)
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("tokencake.lifecycle_id", "duplicate_lifecycle_id")
        # The same refusal for metadata sent the authors' way names that field instead.
        xbody = {
            "prompt": "agent",
            "max_tokens": 2,
            "vllm_xargs": {"tokencake": {"lifecycle_id": i}},
        }
        r = post(server.url + "/v1/completions", json=xbody)
        assert (
            r.status_code == 409
            and r.json()["error"]["param"] == "vllm_xargs.tokencake.lifecycle_id"
        )
    wait_pool_idle(server, engine)


def test_out_of_vocabulary_token_is_a_400_on_the_prompt(served):
    server, _ = served
    r = post(server.url + "/v1/completions", json={"prompt": [1, 10**9], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
