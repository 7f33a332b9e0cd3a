"""``POST /v1/responses``: the Responses API over the chat pipeline.

A Responses body is translated into the chat body it means (:mod:`tokencake.responses_api`),
validated and generated exactly like a chat completion, and answered as a ``Response`` object or
its event stream. Errors name the Responses field (``input[2].call_id``, ``max_output_tokens``),
not the chat field the check ran on. With ``store`` (the default) the finished conversation is
kept for ``previous_response_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from tokencake.async_engine import EngineDeadError
from tokencake.fieldpolicy import InvalidField
from tokencake.outputs import RequestOutput
from tokencake.responses_api import (
    ResponseEvents,
    ResponsesRequest,
    UnknownResponse,
    assistant_message,
    finish_status,
    new_response_id,
    output_items,
    parse_responses_request,
    rename_param,
    response_object,
    usage_object,
)
from tokencake.server.errors import APIError
from tokencake.server.metrics import record
from tokencake.server.protocol import GenerationRequest, parse_chat
from tokencake.server.responses import output_parser, split_tool_calls
from tokencake.server.state import State
from tokencake.toolcall import Event, TextDelta, ToolCall

log = logging.getLogger("tokencake.server")


def parse_responses(body: Any, st: State) -> GenerationRequest:
    """A Responses body as the chat request it means; refusals name Responses fields."""
    try:
        rq = parse_responses_request(body, st.response_store, lenient=st.lenient)
    except UnknownResponse as exc:
        raise APIError(404, str(exc), exc.param, code="response_not_found") from None
    try:
        p = parse_chat(rq.chat_body, st.model_name, st.lenient)
    except (APIError, InvalidField) as exc:
        raise _renamed(exc, rq) from None
    p.responses = rq
    p.max_tokens_param = "max_output_tokens"
    return p


def _renamed(exc: APIError | InvalidField, rq: ResponsesRequest) -> APIError:
    old = exc.param
    new = rename_param(old, rq)
    message = exc.message if isinstance(exc, APIError) else str(exc)
    if old and new and old != new:
        message = message.replace(old, new)
    if isinstance(exc, APIError):
        return APIError(exc.status, message, new, exc.type, exc.code)
    return APIError(400, message, new)


def _usage(out: RequestOutput) -> dict[str, Any]:
    return usage_object(len(out.prompt_token_ids), len(out.token_ids), out.num_cached_tokens)


def _remember(
    st: State, rq: ResponsesRequest, rid: str, content: str | None, calls: list[ToolCall]
) -> None:
    if rq.store:
        st.response_store.put(rid, rq.history + [assistant_message(content, calls)])


async def responses_json(
    st: State,
    p: GenerationRequest,
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
    start: float,
) -> web.Response:
    rq = p.responses
    assert rq is not None
    final = first
    async for out in outputs:
        final = out
    record(st.metrics, True, final, start)
    content, calls = split_tool_calls(p, final.text)
    status, reason = finish_status(final.finish_reason)
    rid = new_response_id()
    obj = response_object(
        rid, st.model_name, time.time(), rq.echo, output_items(content, calls), status,
        _usage(final), reason,
    )  # fmt: skip
    _remember(st, rq, rid, content, calls)
    if p.on_done is not None:
        await p.on_done(calls)
    return web.json_response({**obj, **p.response_extra}, headers=p.response_headers)


async def responses_stream(
    request: web.Request,
    st: State,
    p: GenerationRequest,
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
    start: float,
) -> web.StreamResponse:
    rq = p.responses
    assert rq is not None
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                 **p.response_headers}
    )  # fmt: skip
    await resp.prepare(request)
    rid = new_response_id()
    events = ResponseEvents(rid, st.model_name, rq.echo)
    parser = output_parser(p)

    async def send(items: list[dict[str, Any]]) -> None:
        for ev in items:
            data = json.dumps(ev, separators=(",", ":"))
            await resp.write(f"event: {ev['type']}\ndata: {data}\n\n".encode())

    try:
        await send(events.start())
        o = first
        while True:
            parsed: list[Event] = []
            if parser is not None:
                parsed = parser.feed(o.delta_text)
                if o.finished:
                    parsed += parser.finish()
            elif o.delta_text:
                parsed = [TextDelta(o.delta_text)]
            for e in parsed:
                await send(events.feed(e))
            if o.finished:
                break
            o = await outputs.__anext__()
        record(st.metrics, True, o, start)
        await send(events.finish(o.finish_reason, _usage(o)))
        text = "".join(
            part["text"] for item in events.output if item["type"] == "message" for part in item["content"]
        )  # fmt: skip
        calls = [
            ToolCall(item["call_id"], item["name"], item["arguments"])
            for item in events.output
            if item["type"] == "function_call"
        ]
        _remember(st, rq, rid, text or None, calls)
        if p.on_done is not None:
            await p.on_done(calls)
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client left; the finally of AsyncEngine.stream aborts the request
    except Exception as exc:
        # Headers are out: report in-band with response.failed, as OpenAI does.
        if isinstance(exc, EngineDeadError):
            message = "the engine is not running"
        else:
            log.exception(json.dumps({"event": "stream_error", "request_id": p.request_id}))
            message = "internal server error"
        with contextlib.suppress(Exception):
            await send([events.failed(message)])
    with contextlib.suppress(Exception):
        await resp.write_eof()
    return resp


__all__ = ["parse_responses", "responses_json", "responses_stream"]
