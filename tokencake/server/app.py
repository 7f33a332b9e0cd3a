"""The aiohttp application: middleware (errors, logs, auth), route handlers and generation."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokencake.async_engine import AsyncEngine, EngineDeadError
from tokencake.fieldpolicy import InvalidField
from tokencake.outputs import RequestOutput
from tokencake.responses_api import ResponseStore
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.faults import RequestFault
from tokencake.scheduler.lifecycle import Disposition
from tokencake.server.body import read_json
from tokencake.server.errors import APIError, bad, fault_error, rejection_error
from tokencake.server.lifecycles import calls_of, open_lifecycle
from tokencake.server.openapi import openapi_spec
from tokencake.server.protocol import (
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_event,
    with_sampling_defaults,
)
from tokencake.server.responses import close_stream, final_body, record_choices, stream_response
from tokencake.server.responses_route import parse_responses, responses_json, responses_stream
from tokencake.server.state import (
    ENGINE_KEY,
    REQUEST_ID_KEY,
    STATE_KEY,
    WIRE_NAMES_KEY,
    State,
    state_of,
)
from tokencake.toolcall.render import template_info

log = logging.getLogger("tokencake.server")

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


# ---- middlewares -------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_and_logs(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI-style error; log one JSON line per request."""
    start = time.perf_counter()
    st = state_of(request)
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except APIError as exc:
        status = exc.status
        return exc.response()
    except InvalidField as exc:  # a malformed or unknown request field (protocol parsing)
        status = 400
        return APIError(400, str(exc), exc.param).response()
    except RequestRejected as exc:  # raised where the problem was found; mapped here, once
        err = rejection_error(exc, request.get(WIRE_NAMES_KEY, {}))
        status = err.status
        return err.response()
    except RequestFault as exc:  # the request's own data broke the engine: it alone failed
        err = fault_error(exc)
        status = err.status
        return err.response()
    except web.HTTPException as exc:
        status = exc.status
        if exc.status == 413:
            return APIError(
                413, f"request body exceeds the {st.max_body_bytes} byte limit", None
            ).response()
        if exc.status < 400:
            raise
        return APIError(exc.status, exc.reason, None).response()
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # client went away (nginx's spelling); nothing to answer
        raise
    except EngineDeadError:
        status = 503
        log.error(json.dumps({"event": "engine_dead", "path": request.path}))
        return APIError(503, "the engine is not running", None).response()
    except Exception:
        log.exception(
            json.dumps({"event": "internal_error", "method": request.method, "path": request.path})
        )
        return APIError(500, "internal server error", None).response()
    finally:
        route = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "unmatched"
        )
        st.metrics.requests.labels(route, str(status)).inc()
        log.info(json.dumps({
            "event": "request", "method": request.method, "path": request.path, "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 2),
            "request_id": request.get(REQUEST_ID_KEY),
        }))  # fmt: skip


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = state_of(request).api_key
    if key and request.path != "/health":
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(401, "missing or invalid API key", None, code="invalid_api_key")
    return await handler(request)


# ---- handlers ----------------------------------------------------------------------------------
async def _json_body(request: web.Request) -> Any:
    st = state_of(request)
    return await read_json(request, st.max_body_bytes, st.body_timeout_s)


async def health(request: web.Request) -> web.Response:
    st = state_of(request)
    if not st.engine.alive:
        return web.json_response({"status": "error", "reason": "engine stopped"}, status=503)
    if st.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    st = state_of(request)
    card = {
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "tokencake",
        "max_model_len": st.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def metrics(request: web.Request) -> web.Response:
    st = state_of(request)
    m = st.metrics
    m.engine_up.set(1 if st.engine.alive else 0)
    with contextlib.suppress(EngineDeadError, TimeoutError):  # serve stale gauges, not an error
        m.set_kv(await asyncio.wait_for(st.engine.kv_stats(), timeout=5.0))
    return web.Response(
        body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(state_of(request).model_name))


async def completions(request: web.Request) -> web.StreamResponse:
    st = state_of(request)
    p = parse_completion(await _json_body(request), st.model_name, st.lenient)
    return await _generate(request, st, p)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = state_of(request)
    p = parse_chat(await _json_body(request), st.model_name, st.lenient)
    return await _generate(request, st, p)


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: translated to a chat request, generated, answered as a Response."""
    st = state_of(request)
    p = parse_responses(await _json_body(request), st)
    return await _generate(request, st, p)


async def events(request: web.Request) -> web.Response:
    """``stall_started`` / ``stall_finished`` (paper §8.2); the engine owns the state machine."""
    st = state_of(request)
    ev = parse_event(await _json_body(request))
    request[REQUEST_ID_KEY] = ev.lifecycle_id

    try:
        disposition, out = await asyncio.wait_for(st.engine.lifecycle_event(ev), timeout=30.0)
    except TimeoutError:
        raise APIError(503, "the engine did not answer in time", None) from None
    st.metrics.events.labels(ev.event, disposition.value).inc()
    status = disposition.http_status
    detail = out.pop("error", None) or out.pop("message", None)
    payload = {
        **out,
        "lifecycle_id": ev.lifecycle_id,
        "event": ev.event,
        "disposition": disposition.value,
    }
    if status >= 400:
        message = str(
            detail or _EVENT_MESSAGES.get(disposition) or f"{ev.event}: {disposition.value}"
        )
        param = "lifecycle_id" if status in (404, 409) else None
        err = APIError(status, message, param, code=disposition.value)
        return web.json_response({**payload, **err.body()}, status=status)
    return web.json_response(payload, status=status)


_EVENT_MESSAGES = {
    Disposition.UNKNOWN: "unknown lifecycle_id (never seen, or its record expired)",
    Disposition.CONFLICT: "the event conflicts with the lifecycle's state (a different start, or a finish without a start)",
    Disposition.UNAVAILABLE: "lifecycle events are unavailable",
}


# ---- generation --------------------------------------------------------------------------------
async def _tokenize(st: State, p: GenerationRequest) -> list[int]:
    """Token ids of the prompt, computed on the engine thread (which owns the tokenizer)."""
    if p.chat:
        # Tool definitions, calls and results go through the model's template (or the fallback
        # prompt); the template's tool-call format decides how the output is parsed.
        p.template = template_info(st.engine.info.chat_template)
        return await st.engine.tokenize_chat(
            p.messages or [], p.add_generation_prompt, p.tool_request
        )
    return await st.engine.tokenize(p.prompt or "")


def _sampling(st: State, p: GenerationRequest, n_prompt: int) -> SamplingParams:
    prompt_param = "messages" if p.chat else "prompt"
    room = st.max_seq_tokens - n_prompt
    if room < 1:
        raise bad(
            f"this model's maximum context length is {st.max_seq_tokens} tokens; the prompt has {n_prompt} tokens, leaving no room to generate",
            prompt_param,
        )
    max_tokens = p.max_tokens if p.max_tokens is not None else room
    if st.max_tokens_limit is not None:
        if p.max_tokens is not None and max_tokens > st.max_tokens_limit:
            raise bad(
                f"{p.max_tokens_param} must be at most {st.max_tokens_limit}", p.max_tokens_param
            )
        max_tokens = min(max_tokens, st.max_tokens_limit)
    if max_tokens > room:
        raise bad(
            f"this model's maximum context length is {st.max_seq_tokens} tokens; the prompt has {n_prompt} tokens and {p.max_tokens_param}={max_tokens} asks for more than the {room} left",
            p.max_tokens_param,
        )
    kw = with_sampling_defaults(p.params, st.sampling_defaults)
    if p.structured is not None:
        kw["structured"] = p.structured
    if kw["top_k"] >= st.vocab_size:
        # Keeping every token is "no top-k"; and the engine's int32 sampler must never see a
        # client's 2**40 (it would take the engine thread down).
        kw["top_k"] = 0
    return SamplingParams(max_tokens=max_tokens, **kw)


async def _generate(request: web.Request, st: State, p: GenerationRequest) -> web.StreamResponse:
    if st.draining:
        raise APIError(503, "the server is shutting down", None)
    if not st.engine.alive:
        raise EngineDeadError("engine stopped")
    request[REQUEST_ID_KEY] = p.request_id
    request[WIRE_NAMES_KEY] = p.wire_names
    st.begin()
    outputs: AsyncIterator[RequestOutput] | None = None
    try:
        token_ids = await _tokenize(st, p)
        if not token_ids:
            raise bad("the prompt is empty after tokenization", "messages" if p.chat else "prompt")
        params = _sampling(st, p, len(token_ids))
        await open_lifecycle(st, p)  # a tool return ends its stall before this is queued
        start = time.perf_counter()
        outputs = _open_stream(st, p, token_ids, params)
        first = await _first(outputs)
        if p.responses is not None:  # POST /v1/responses: same generation, its own shapes
            if p.stream:
                return await responses_stream(request, st, p, outputs, first, start)
            return await responses_json(st, p, outputs, first, start)
        if p.stream:
            return await stream_response(request, st, p, outputs, first, start)
        last = first
        finals = {first.index: first} if first.finished else {}
        async for last in outputs:
            if last.finished:
                finals[last.index] = last
        outs = [finals[i] for i in sorted(finals)] or [last]
        record_choices(st.metrics, p.chat, outs, start)
        body = final_body(st, p, outs, params)
        if p.on_done is not None:
            await p.on_done(calls_of(body))
        return web.json_response({**body, **p.response_extra}, headers=p.response_headers)
    finally:
        if outputs is not None:
            await close_stream(outputs)  # aborts the request unless it finished
        st.end()


def _open_stream(
    st: State, p: GenerationRequest, token_ids: list[int], params: SamplingParams
) -> AsyncIterator[RequestOutput]:
    return st.engine.stream(
        token_ids, params, request_id=p.request_id, metadata=p.ticket or p.metadata
    ).__aiter__()


async def _first(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The first output: the engine's refusals (typed) surface here, before any byte is sent."""
    return await outputs.__anext__()


# ---- app ---------------------------------------------------------------------------------------
def build_app(
    async_engine: AsyncEngine,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_limit: int | None = None,
    drain_timeout_s: float = 30.0,
    body_timeout_s: float = 30.0,
    lenient: bool = False,
    response_store: ResponseStore | None = None,
) -> web.Application:
    """The aiohttp application over a running :class:`AsyncEngine`.

    ``api_key`` (when set) is required as ``Authorization: Bearer <key>`` on every route but
    ``/health``. ``max_tokens_limit`` caps a request's generation budget. ``lenient`` ignores
    unknown request fields instead of refusing them (the error lists all of them).
    ``response_store`` holds ``/v1/responses`` conversations for ``previous_response_id``
    (default: 1024 responses / 64 MiB, least recently used dropped first). On shutdown the app
    refuses new generations and waits up to ``drain_timeout_s`` for in-flight ones; the caller
    owns the engine and shuts it down after the app. Reading a body may take at most
    ``body_timeout_s`` (408 past it); connection limits live in ``start_site``.
    """
    app = web.Application(middlewares=[_errors_and_logs, _auth], client_max_size=max_body_bytes)
    app[ENGINE_KEY] = async_engine
    app[STATE_KEY] = State(
        async_engine,
        api_key,
        max_tokens_limit,
        drain_timeout_s,
        max_body_bytes,
        body_timeout_s,
        lenient=lenient,
        response_store=response_store,
    )
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/tokencake/events", events)
    app.on_shutdown.append(_drain)
    return app


async def _drain(app: web.Application) -> None:
    st: State = app[STATE_KEY]  # type: ignore[assignment]
    st.draining = True
    log.info(json.dumps({"event": "draining", "in_flight": st.in_flight}))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(st.idle.wait(), st.drain_timeout_s)
