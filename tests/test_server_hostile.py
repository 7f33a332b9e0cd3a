"""Issue 15 over HTTP: hostile bodies never get a 5xx, connections are bounded in time and
number, client-sized work stays off the engine thread, and one bad request harms no other."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import uuid

import pytest

from tests.test_server import MODEL, get, post, request, stream, wait_pool_idle
from tokencake.server import BackgroundServer
from tokencake.server.body import MAX_JSON_DEPTH
from tokencake.server.connections import ConnectionLimits


def _comp(**kw):
    """A completion body; ``tokencake`` metadata gets a fresh wire-format lifecycle id."""
    if "tokencake" in kw and "lifecycle_id" not in kw["tokencake"]:
        kw["tokencake"] = {"lifecycle_id": "tc-" + uuid.uuid4().hex, **kw["tokencake"]}
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **kw}


def _err(r):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    return json.loads(r.text)["error"]


# ---- finding 3: bodies -------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deep_json_is_400(served, depth):
    server, _ = served
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    err = _err(request("POST", server.url + "/v1/completions", content=body))
    assert "nested" in err["message"] or "not valid JSON" in err["message"]


def test_deep_json_inside_a_json_string_is_400(served):
    server, _ = served
    deep = "[" * 5000 + "]" * 5000
    err = _err(post(server.url + "/v1/completions", _comp(vllm_xargs={"tokencake": deep})))
    assert err["param"] == "vllm_xargs.tokencake"


def test_content_encoding(served):
    server, _ = served
    url = server.url + "/v1/completions"
    raw = json.dumps(_comp()).encode()
    ok = request("POST", url, content=gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    assert ok.status_code == 200, ok.text
    bad = request("POST", url, content=raw, headers={"Content-Encoding": "gzip"})
    assert bad.status_code == 400 and "could not be read" in _err(bad)["message"]
    unknown = request("POST", url, content=raw, headers={"Content-Encoding": "snappy"})
    assert unknown.status_code == 415


def test_wrong_content_type_is_415(served):
    server, _ = served
    raw = json.dumps(_comp()).encode()
    r = request("POST", server.url + "/v1/completions", content=raw,
                headers={"Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 415 and _err(r)["code"] == "unsupported_media_type"
    r = request("POST", server.url + "/v1/completions", content=raw,
                headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert r.status_code == 200


@pytest.mark.parametrize(
    "patch,param",
    [
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": 10**400}, "top_p"),
        ({"max_tokens": 10**400}, "max_tokens"),
        ({"tokencake": {"importance": 10**400}}, "tokencake.importance"),
        ({"tokencake": {"importance": 1e308}}, "tokencake.importance"),
        ({"tokencake": {"depth": 9 * 10**306}}, "tokencake.depth"),
        ({"tokencake": {"similarity": 5e-324}}, "tokencake.similarity"),
        ({"tokencake": {"memory_weight": 1e308}}, "tokencake.memory_weight"),
        ({"tokencake": {"agent_type": "x" * 300}}, "tokencake.agent_type"),
        ({"stop": ["s" * 2000]}, "stop"),
    ],
)
def test_out_of_range_fields_are_400_naming_the_field(served, patch, param):
    server, _ = served
    body = json.dumps(_comp(**patch)).encode()  # json.dumps writes the 400-digit integers
    err = _err(request("POST", server.url + "/v1/completions", content=body))
    assert err["param"] == param, err


def test_events_bounds(served):
    server, _ = served
    lid = "tc-" + uuid.uuid4().hex
    url = server.url + "/v1/tokencake/events"
    body = json.dumps({"event": "stall_started", "lifecycle_id": lid,
                       "estimated_duration_s": 10**400}).encode()  # fmt: skip
    assert _err(request("POST", url, content=body))["param"] == "estimated_duration_s"
    r = post(url, {"event": "stall_started", "lifecycle_id": lid, "kind": "k" * 300})
    assert _err(r)["param"] == "kind"
    r = post(url, {"event": "stall_started", "lifecycle_id": lid + "\n"})
    assert _err(r)["param"] == "lifecycle_id"


def test_lifecycle_id_with_trailing_newline_is_400(served):
    server, _ = served
    lid = "tc-" + uuid.uuid4().hex + "\n"
    err = _err(post(server.url + "/v1/completions", _comp(tokencake={"lifecycle_id": lid})))
    assert err["param"] == "tokencake.lifecycle_id"


# ---- finding 1: one bad request, many good ones --------------------------------------------------
def test_hostile_metadata_never_touches_innocent_streams(served):
    server, engine = served
    results: dict[int, list[str]] = {}

    def good(i: int) -> None:
        body = _comp(prompt=f"agent {i} says", max_tokens=12, stream=True, ignore_eos=True,
                     tokencake={"agent_type": f"t{i % 3}", "depth": i % 4})  # fmt: skip
        # Generous timeout: 20 streams on a shared 2-core machine can queue for a while.
        with stream(server.url + "/v1/completions", body, timeout=600) as (status, lines):
            assert status == 200
            results[i] = list(lines)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    hostile = [{"importance": 1e308}, {"memory_weight": 1e308}, {"similarity": 5e-324},
               {"depth": 10**400}, {"agent_type": "poisontype", "depth": 9 * 10**306}]  # fmt: skip
    for md in hostile * 6:
        body = json.dumps(_comp(tokencake=md)).encode()
        assert request("POST", server.url + "/v1/completions", content=body).status_code == 400
    for t in threads:
        t.join(600)
    assert len(results) == 20
    for lines in results.values():
        assert lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)
    wait_pool_idle(server, engine)


# ---- finding 5: nothing client-sized on the engine thread ----------------------------------------
def test_prompt_longer_than_any_context_is_refused_before_tokenizing(served):
    server, engine = served
    limit = engine.max_prompt_chars
    calls = []
    tok = engine.engine.tokenizer
    real = tok.encode
    tok.encode = lambda *a, **k: calls.append(1) or real(*a, **k)  # the engine's own copy
    try:
        t0 = time.monotonic()
        err = _err(post(server.url + "/v1/completions", _comp(prompt="x" * (limit + 1))))
        assert err["param"] == "prompt" and time.monotonic() - t0 < 5
    finally:
        tok.encode = real
    assert not calls


def test_request_text_is_tokenized_off_the_engine_thread(served):
    server, engine = served
    r = post(server.url + "/v1/completions", _comp())  # makes sure the worker's copy exists
    assert r.status_code == 200
    worker_tok = engine._request_tokenizer
    assert worker_tok is not None and worker_tok is not engine.engine.tokenizer
    threads = []
    real = worker_tok.encode
    worker_tok.encode = lambda *a, **k: (
        threads.append(threading.current_thread().name) or real(*a, **k)
    )
    try:
        assert post(server.url + "/v1/completions", _comp(prompt="off thread")).status_code == 200
    finally:
        worker_tok.encode = real
    assert threads and all(n.startswith("tokencake-tokenize") for n in threads)


# ---- finding 4: connections ----------------------------------------------------------------------
@pytest.fixture
def strict_server(served):
    _, engine = served
    limits = ConnectionLimits(max_connections=8, header_timeout_s=0.5, body_timeout_s=0.5,
                              keepalive_timeout_s=1.0)  # fmt: skip
    server = BackgroundServer(engine, limits=limits, body_timeout_s=0.5)
    yield server
    server.stop()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slowloris_and_idle_connections_are_closed(strict_server):
    port = strict_server.port
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes
    idle = socket.create_connection(("127.0.0.1", port))  # never sends a byte
    assert _closed_within(slow, 5.0) and _closed_within(idle, 5.0)
    assert strict_server.runner  # still serving
    assert get(strict_server.url + "/health").status_code == 200


def test_slow_body_is_408(strict_server):
    s = socket.create_connection(("127.0.0.1", strict_server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{")  # fmt: skip
    s.settimeout(10)
    head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 408"), head[:100]
    s.close()


def test_connections_beyond_the_cap_get_a_fast_503(strict_server):
    held = [socket.create_connection(("127.0.0.1", strict_server.port)) for _ in range(8)]
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        r = get(strict_server.url + "/health")
        assert r.status_code == 503 and time.monotonic() - t0 < 2
        assert json.loads(r.text)["error"]["code"] == "too_many_connections"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while get(strict_server.url + "/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
