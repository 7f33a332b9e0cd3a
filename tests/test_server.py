"""The HTTP server over the tiny random model: the official ``openai`` client (completions, chat,
streaming, logprobs, usage), every validation refusal (a JSON error body naming the field), auth,
client disconnects aborting and freeing blocks, internal errors, metrics, and draining."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tokencake.async_engine import AsyncEngine
from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.server import BackgroundServer, openapi_spec

ENGINE = dict(
    num_pages=128,
    warmup=False,
    max_model_len=256,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_prefill_chunk=64,
    max_prefill_seqs=2,
)
MODEL = "tiny-llama"
LONG = "multi-agent applications alternate llm calls and tool calls; " * 2


def make_async_engine(tiny_model) -> AsyncEngine:
    cfg, params, tok = tiny_model
    return AsyncEngine(
        LLMEngine(EngineConfig(**ENGINE), model_config=cfg, params=params, tokenizer=tok)
    )


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def wait_pool_idle(server: BackgroundServer, engine: AsyncEngine, timeout: float = 20.0) -> None:
    """Every block is free or evictable-cached, and the pool is consistent."""
    deadline = time.monotonic() + timeout
    while True:
        free, cap, live = server.run(
            engine.call(lambda e: (e.pool.num_free, e.pool.capacity, len(e.scheduler.requests)))
        )
        if free == cap and live == 0:
            break
        assert time.monotonic() < deadline, (
            f"blocks still held: free {free} of {cap}, {live} live requests"
        )
        time.sleep(0.05)
    server.run(engine.call(lambda e: e.pool.check_integrity()))


def lifecycle_id() -> str:
    return "tc-" + uuid.uuid4().hex


# ---- a minimal stdlib HTTP client (streams can be dropped mid-way, which is the point) --------
@dataclass
class Resp:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def _conn(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout), u.path or "/"


def request(
    method: str,
    url: str,
    json_body: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Resp:
    conn, path = _conn(url, timeout)
    try:
        data = (
            content
            if content is not None
            else (None if json_body is None else json.dumps(json_body).encode())
        )
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        r = conn.getresponse()
        return Resp(r.status, r.read().decode(errors="replace"))
    finally:
        conn.close()


def get(url: str, **kw: Any) -> Resp:
    return request("GET", url, **kw)


def post(url: str, json: Any = None, **kw: Any) -> Resp:
    return request("POST", url, json_body=json, **kw)


@contextlib.contextmanager
def stream(url: str, body: Any, timeout: float = 60.0) -> Iterator[tuple[int, Iterator[str]]]:
    """POST and yield (status, SSE line iterator); leaving the block drops the connection."""
    conn, path = _conn(url, timeout)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        r = conn.getresponse()
        lines = (ln.decode().rstrip("\r\n") for ln in iter(r.readline, b""))
        yield r.status, (ln for ln in lines if ln)
    finally:
        with contextlib.suppress(OSError):
            conn.sock and conn.sock.shutdown(2)
        conn.close()


# ---- happy paths ------------------------------------------------------------------------------
def test_models_health_openapi(served, client):
    server, _ = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert get(server.url + "/health").json() == {"status": "ok"}
    spec = get(server.url + "/openapi.json").json()
    assert spec == json.loads(json.dumps(openapi_spec(MODEL)))
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


def test_completion_stream_and_usage(served, client):
    kw = dict(
        model=MODEL, prompt=LONG, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens == len(LONG)
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    # The same prompt again is served from the prefix cache; the answer does not change.
    again = client.completions.create(**kw)
    assert again.choices[0].text == full.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # A token-id prompt gives the same answer as its text.
    ids = client.completions.create(
        model=MODEL,
        prompt=list(LONG.encode()),
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert ids.choices[0].text == full.choices[0].text


def test_chat_and_stream(served, client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_completion_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 10
    stream = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs(served, client):
    out = client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=4,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(len(t) <= 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(
        v == pytest.approx(max(t.values()))
        for v, t in zip(lp.token_logprobs, lp.top_logprobs, strict=True)
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_stop_and_seed(served, client):
    base = (
        client.completions.create(
            model=MODEL, prompt="abc", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = next(ch for ch in base[3:] if ch.strip() and ch != "\ufffd")
    cut = client.completions.create(
        model=MODEL,
        prompt="abc",
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert (
        cut.choices[0].finish_reason == "stop" and cut.choices[0].text == base[: base.index(stop)]
    )
    sampled = [
        client.completions.create(
            model=MODEL,
            prompt="abc",
            max_tokens=12,
            temperature=1.0,
            top_p=0.9,
            extra_body={"top_k": 50},
            seed=7,
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_huge_top_k_is_no_top_k(served, client):
    # A top_k past the vocabulary keeps every token; it must not reach the int32 sampler.
    for k in (2**40, 2**31, 257):
        out = client.completions.create(
            model=MODEL, prompt="x", max_tokens=2, temperature=1.0, extra_body={"top_k": k}
        )
        assert out.usage.completion_tokens >= 1
    assert get(served[0].url + "/health").json() == {"status": "ok"}


def test_agent_metadata_both_spellings(served, client):
    lid = lifecycle_id()
    meta = {"lifecycle_id": lid, "agent_type": "planner", "depth": 1, "critical_path": True}
    out = client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"tokencake": meta}
    )
    # The lifecycle id names the lifecycle (reusable per conversation), not the request.
    assert out.model_extra["tokencake"] == {"lifecycle_id": lid, "source": "annotated"}
    lid2 = lifecycle_id()
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        extra_body={
            "vllm_xargs": {"tokencake": {**meta, "lifecycle_id": lid2}},
            "request_id": lid2,
        },
    )
    assert out.id == lid2


# ---- refusals ---------------------------------------------------------------------------------
GOOD_META = {"lifecycle_id": "tc-" + "0" * 12 + "4" + "0" * 3 + "8" + "0" * 15}
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "foo": 1}, "foo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": "a"}, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    (
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "stream": True, "stream_options": {"bogus": 1}},
        "stream_options.bogus",
    ),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [999_999]}, "prompt"),
    ("/v1/completions", {"prompt": [1.5]}, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 300}, "prompt"),
    (
        "/v1/completions",
        {"prompt": "x", "tokencake": {**GOOD_META, "depth": -1}},
        "tokencake.depth",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "tokencake": {**GOOD_META, "critical_path": "yes"}},
        "tokencake.critical_path",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "tokencake": {"lifecycle_id": "not-an-id"}},
        "tokencake.lifecycle_id",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "tokencake": {"lifecycle_id": ""}},
        "tokencake.lifecycle_id",
    ),
    ("/v1/completions", {"prompt": "x", "tokencake": [1]}, "tokencake"),
    (
        "/v1/completions",
        {"prompt": "x", "vllm_xargs": {"tokencake": {**GOOD_META, "similarity": 2}}},
        "vllm_xargs.tokencake.similarity",
    ),
    ("/v1/completions", {"prompt": "x", "vllm_xargs": {"other": 1}}, "vllm_xargs.other"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        "messages[0].tool_calls",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "yaml"},
        },
        "response_format.type",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]},
        "tools[0].type",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
    ("/v1/tokencake/events", {"event": "nope", "lifecycle_id": "x"}, "event"),
    ("/v1/tokencake/events", {"event": "stall_started"}, "lifecycle_id"),
    ("/v1/tokencake/events", {"event": "stall_started", "lifecycle_id": "x", "extra": 1}, "extra"),
    (
        "/v1/tokencake/events",
        {"event": "stall_finished", "lifecycle_id": "x", "kind": "tool"},
        "kind",
    ),
    (
        "/v1/tokencake/events",
        {"event": "stall_started", "lifecycle_id": "x", "estimated_duration_s": None},
        "estimated_duration_s",
    ),
    (
        "/v1/tokencake/events",
        {"event": "stall_started", "lifecycle_id": "x", "estimated_duration_s": -1},
        "estimated_duration_s",
    ),
    ("/v1/tokencake/events", {"event": "stall_started", "lifecycle_id": "x", "kind": ""}, "kind"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    BAD_REQUESTS,
    ids=[f"{p.rsplit('/', 1)[1]}-{param}-{i}" for i, (p, _, param) in enumerate(BAD_REQUESTS)],
)
def test_validation_errors_name_the_field(served, path, body, param):
    r = post(served[0].url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert isinstance(err["message"], str) and err["message"]


def test_unknown_model_and_route(served):
    url = served[0].url
    r = post(url + "/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies(served, content):
    r = post(
        served[0].url + "/v1/completions",
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_body_size_limit(served):
    r = post(served[0].url + "/v1/completions", json={"prompt": "x" * (5 * 2**20)})
    assert r.status_code == 413 and "error" in r.json()


def test_duplicate_request_id_conflicts(served, client):
    lid = lifecycle_id()
    body = {
        "prompt": "x" * 40,
        "max_tokens": 200,
        "stream": True,
        "request_id": lid,
        "ignore_eos": True,
    }
    url = served[0].url + "/v1/completions"
    with stream(url, body) as (_, lines):
        next(lines)
        r = post(url, json={**body, "stream": False})
        assert r.status_code == 409 and r.json()["error"]["param"] == "request_id"
    wait_pool_idle(*served)


# ---- disconnects, internal errors -------------------------------------------------------------
def test_stream_disconnect_aborts_and_frees_blocks(served):
    server, engine = served
    aborted: list[str] = []
    real_abort, real_step = engine.engine.abort_request, engine.engine.step

    def slow_step():  # keep requests alive long enough for the client to give up
        time.sleep(0.01)
        return real_step()

    engine.engine.abort_request = lambda rid: aborted.append(rid) or real_abort(rid)
    engine.engine.step = slow_step
    try:
        lids = [lifecycle_id() for _ in range(3)]
        for lid in lids:
            body = {
                "prompt": LONG,
                "max_tokens": 120,
                "stream": True,
                "request_id": lid,
                "ignore_eos": True,
            }
            with stream(server.url + "/v1/completions", body) as (status, lines):
                assert status == 200 and next(lines).startswith("data: ")
            # Leaving the block closed the connection mid-stream.
        # A non-streaming client that gives up also aborts its request.
        lid = lifecycle_id()
        with pytest.raises(TimeoutError):
            post(
                server.url + "/v1/completions",
                json={"prompt": LONG, "max_tokens": 120, "request_id": lid, "ignore_eos": True},
                timeout=0.3,
            )
        lids.append(lid)
        wait_pool_idle(server, engine)
        assert set(lids) <= set(aborted)
    finally:
        del engine.engine.abort_request, engine.engine.step
    assert get(server.url + "/health").json()["status"] == "ok"


def test_internal_error_is_sanitized_and_server_keeps_serving(served, client):
    server, engine = served

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    engine.stream = boom
    try:
        r = post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "internal server error" and "secret" not in r.text
    finally:
        del engine.stream
    real = engine.stream

    async def dies_mid_stream(*args, **kwargs):
        async for out in real(*args, **kwargs):
            yield out
            raise RuntimeError("secret mid-stream detail")

    engine.stream = dies_mid_stream
    try:
        body = {"prompt": "x", "max_tokens": 20, "stream": True, "ignore_eos": True}
        with stream(server.url + "/v1/completions", body) as (status, it):
            lines = list(it)
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"][
            "type"
        ] == "internal_error" and "secret" not in "".join(lines)
    finally:
        del engine.stream
    assert (
        client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text is not None
    )
    wait_pool_idle(server, engine)


def test_metrics(served, client):
    server, _ = served
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    text = get(server.url + "/metrics").text
    assert "tokencake_kv_blocks_capacity 127.0" in text
    assert 'tokencake_http_requests_total{route="/v1/completions",status="200"}' in text
    assert (
        "tokencake_generation_tokens_total" in text
        and "tokencake_request_latency_seconds_bucket" in text
    )
    assert "tokencake_engine_up 1.0" in text


# ---- auth and shutdown ------------------------------------------------------------------------
def test_api_key(served):
    _, engine = served
    server = BackgroundServer(engine, api_key="sekret")
    try:
        assert get(server.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            r = get(server.url + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = post(
            server.url + "/v1/completions",
            json={"prompt": "x"},
            headers={"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 401
        r = post(
            server.url + "/v1/tokencake/events", json={}, headers={"Authorization": "Basic sekret"}
        )
        assert r.status_code == 401
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
        assert (
            ok.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens
            >= 1
        )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.stop()


def test_graceful_shutdown_drains_in_flight(served):
    _, engine = served
    server = BackgroundServer(engine)
    got: dict[str, list[str]] = {}
    started = threading.Event()

    def client_thread() -> None:
        body = {"prompt": LONG, "max_tokens": 60, "stream": True, "ignore_eos": True}
        with stream(server.url + "/v1/completions", body, timeout=30) as (_, it):
            lines = []
            for ln in it:
                lines.append(ln)
                started.set()
            got["lines"] = lines

    t = threading.Thread(target=client_thread)
    t.start()
    assert started.wait(30)
    server.stop()  # drains: the in-flight stream completes
    t.join(30)
    lines = got["lines"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(ConnectionRefusedError):
        get(server.url + "/health", timeout=2)
