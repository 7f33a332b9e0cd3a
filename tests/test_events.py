"""``POST /v1/tokencake/events`` over the tiny model: every disposition and its status code,
duplicates, out-of-order events, unknown ids and expiry (paper digest §8.2)."""

from __future__ import annotations

import uuid

import pytest

from tests.test_server import MODEL, get, post, stream, wait_pool_idle
from tokencake.server import BackgroundServer, lifecycle_handler


@pytest.fixture
def clock(served):
    """Shift the lifecycle clock forward (expiry is lazy and clock-driven); restored after."""
    server, engine = served
    lifecycle = server.run(engine.call(lambda e: e.scheduler.lifecycle))
    real = lifecycle.clock
    offset = [0.0]
    lifecycle.clock = lambda: real() + offset[0]

    def advance(seconds: float) -> None:
        offset[0] += seconds

    yield advance
    lifecycle.clock = real


def lid() -> str:
    return "tc-" + uuid.uuid4().hex


def annotated(server: BackgroundServer, **meta) -> str:
    """Run one annotated completion to the end; returns its lifecycle id."""
    i = lid()
    body = {
        "model": MODEL,
        "prompt": "agent says",
        "max_tokens": 3,
        "tokencake": {"lifecycle_id": i, "agent_type": "searcher", **meta},
    }
    r = post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["tokencake"]["lifecycle_id"] == i
    return i


def event(server: BackgroundServer, name: str, i: str, **fields) -> tuple[int, dict]:
    r = post(server.url + "/v1/tokencake/events", json={"event": name, "lifecycle_id": i, **fields})
    body = r.json()
    assert body["lifecycle_id"] == i and body["event"] == name
    return r.status_code, body


def test_full_protocol_applied_duplicate(served):
    server, _ = served
    i = annotated(server, offload_eligible=True, reusable_prefix=True)
    status, body = event(server, "stall_started", i, kind="search", estimated_duration_s=0.5)
    assert (status, body["disposition"], body["state"]) == (200, "applied", "active")
    # An identical repeat (a client retry) is a duplicate, still 2xx.
    status, body = event(server, "stall_started", i, kind="search", estimated_duration_s=0.5)
    assert (status, body["disposition"]) == (200, "duplicate")
    status, body = event(server, "stall_finished", i)
    assert (status, body["disposition"]) == (200, "applied")
    status, body = event(server, "stall_finished", i)
    assert (status, body["disposition"]) == (200, "duplicate")


def test_conflicts(served):
    server, _ = served
    i = annotated(server)
    # A finish without a start.
    status, body = event(server, "stall_finished", i)
    assert status == 409 and body["disposition"] == "conflict"
    assert body["error"]["param"] == "lifecycle_id" and body["error"]["code"] == "conflict"
    # A different start after a start.
    assert event(server, "stall_started", i, kind="search")[0] == 200
    status, body = event(server, "stall_started", i, kind="test")
    assert status == 409 and body["disposition"] == "conflict"
    status, body = event(server, "stall_started", i, kind="search", estimated_duration_s=3.0)
    assert status == 409
    # After the finish, a retried identical start is still a duplicate; a new one conflicts.
    assert event(server, "stall_finished", i)[0] == 200
    assert event(server, "stall_started", i, kind="search")[1]["disposition"] == "duplicate"
    assert event(server, "stall_started", i, kind="other")[0] == 409


def test_unknown_ids(served):
    server, _ = served
    for name in ("stall_started", "stall_finished"):
        status, body = event(server, name, lid())
        assert status == 404 and body["disposition"] == "unknown"
        assert (
            body["error"]["type"] == "not_found_error" and body["error"]["param"] == "lifecycle_id"
        )
    # Requests without metadata have no lifecycle.
    r = post(
        server.url + "/v1/completions",
        json={"prompt": "plain", "max_tokens": 2, "request_id": (i := lid())},
    )
    assert r.status_code == 200
    assert event(server, "stall_started", i)[0] == 404


def test_start_before_generation_finishes(served):
    """Out of order: the client may announce the stall while the generation still streams."""
    server, engine = served
    i = lid()
    body = {
        "prompt": "streaming agent",
        "max_tokens": 40,
        "stream": True,
        "ignore_eos": True,
        "tokencake": {"lifecycle_id": i},
    }
    with stream(server.url + "/v1/completions", body) as (status, lines):
        assert status == 200 and next(lines).startswith("data: ")
        status, ev = event(server, "stall_started", i, kind="search")
        assert status == 200 and ev["disposition"] == "applied"
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert event(server, "stall_finished", i)[0] == 200
    wait_pool_idle(server, engine)


def test_lifecycle_id_is_reusable_once_its_request_ended(served):
    """Issue 14: a static extra_body sends the same id with every call of one agent. Once its
    request has ended the id names the new call's lifecycle (the old one's stall finishes);
    events then address the new record. A concurrent reuse is a 409 (test_rejections)."""
    server, _ = served
    i = annotated(server, offload_eligible=True, reusable_prefix=True)
    assert event(server, "stall_started", i, kind="search")[0] == 200
    r = post(
        server.url + "/v1/completions",
        json={"prompt": "again", "max_tokens": 2, "tokencake": {"lifecycle_id": i}},
    )
    assert r.status_code == 200 and r.json()["tokencake"]["lifecycle_id"] == i
    # The first call's stall ended with the new call; the new record awaits its own start.
    status, body = event(server, "stall_finished", i)
    assert status == 409 and body["disposition"] == "conflict"  # a finish before any start
    assert event(server, "stall_started", i, kind="search")[1]["state"] == "active"


def test_expiry_late_finish_and_tombstones(served, clock):
    server, _ = served
    # Active past its safety deadline (>= 60 s, <= 3600 s): expired; the finish is then late.
    i = annotated(server)
    assert event(server, "stall_started", i, kind="slow_tool", estimated_duration_s=1.0)[0] == 200
    clock(3601)
    status, body = event(server, "stall_finished", i)
    assert (status, body["disposition"]) == (200, "late_finish")
    assert event(server, "stall_finished", i)[1]["disposition"] in ("late_finish", "duplicate")
    # Tombstones go after 60 s: the id becomes unknown.
    clock(61)
    assert event(server, "stall_finished", i)[0] == 404
    # Completed but never started within 60 s: expired, so a late start conflicts.
    j = annotated(server)
    clock(61)
    status, body = event(server, "stall_started", j, kind="search")
    assert (status, body["disposition"]) == (409, "conflict")


def test_unavailable_is_503(served):
    server, engine = served
    i = annotated(server)
    lifecycle = server.run(engine.call(lambda e: e.scheduler.lifecycle))
    lifecycle.available = False
    try:
        status, body = event(server, "stall_started", i, kind="search")
        assert status == 503 and body["disposition"] == "unavailable"
        assert body["error"]["type"] == "service_unavailable"
    finally:
        lifecycle.available = True
    assert event(server, "stall_started", i, kind="search")[0] == 200


def test_event_metrics(served):
    server, _ = served
    event(server, "stall_finished", lid())
    text = get(server.url + "/metrics").text
    assert 'tokencake_lifecycle_events_total{disposition="unknown",event="stall_finished"}' in text


def test_lifecycle_handler_lookup():
    class Scheduler:
        def lifecycle_event(self, event):
            return "applied", {}

    class OnScheduler:
        scheduler = Scheduler()

    class Bare:
        scheduler = None

    assert lifecycle_handler(OnScheduler())({}) == ("applied", {})
    assert lifecycle_handler(Bare()) is None
