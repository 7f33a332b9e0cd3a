"""Response bodies: OpenAI JSON completions, usage, logprobs, and SSE streams."""

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
from tokencake.outputs import RequestOutput, TokenLogprob
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.faults import RequestFault
from tokencake.server.errors import APIError, fault_error
from tokencake.server.metrics import record
from tokencake.server.protocol import GenerationRequest
from tokencake.server.state import State
from tokencake.toolcall import ArgsDelta, CallStart, Event, TextDelta, ToolCall, ToolCallParser

log = logging.getLogger("tokencake.server")


def _usage(out: RequestOutput) -> dict[str, Any]:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }


def _token_text(st: State, tid: int) -> str:
    return st.engine.token_texts([tid])[0]


def _completion_logprobs(st: State, lps: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    off = text_offset
    for lp in lps:
        t = _token_text(st, lp.token_id)
        tokens.append(t)
        token_lps.append(lp.logprob)
        top: dict[str, float] = {}
        for i, v in lp.top:  # distinct ids can share a text; keep the likelier (listed first)
            top.setdefault(_token_text(st, i), v)
        tops.append(top or None)
        offsets.append(off)
        off += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chat_logprobs(st: State, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(tid: int, v: float) -> dict[str, Any]:
        t = _token_text(st, tid)
        return {"token": t, "logprob": v, "bytes": list(t.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
            for lp in lps
        ]
    }


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


def chat_finish_reason(out: RequestOutput, called: bool) -> str | None:
    """``tool_calls`` when the model stopped after calling tools (OpenAI's spelling)."""
    reason = _finish_reason(out)
    return "tool_calls" if called and reason == "stop" else reason


def split_tool_calls(p: GenerationRequest, text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished chat output as ``(content, tool calls)``; plain text when calls are not
    parsed or malformed (the client then sees what the model wrote)."""
    parser = output_parser(p)
    if parser is None:
        return text, []
    parser.feed(text)
    parser.finish()
    if parser.malformed or not parser.calls:
        return text, []
    return parser.content or None, list(parser.calls)


def output_parser(p: GenerationRequest) -> ToolCallParser | None:
    """A fresh tool-call parser for ``p``'s output (None when it has no tools to call)."""
    if p.tool_request is None or p.template is None:
        return None
    return p.tool_request.output_parser(p.template)


def tool_call_deltas(events: list[Event]) -> tuple[str, list[dict[str, Any]]]:
    """Parser events as a chat chunk's ``content`` text and ``tool_calls`` deltas (OpenAI's
    shape: the first delta of a call carries its id, type and name, later ones arguments)."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, TextDelta):
            text.append(e.text)
        elif isinstance(e, CallStart):
            calls.append({"index": e.index, "id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})  # fmt: skip
        elif isinstance(e, ArgsDelta):
            if calls and calls[-1]["index"] == e.index:
                calls[-1]["function"]["arguments"] += e.text
            else:
                calls.append({"index": e.index, "function": {"arguments": e.text}})
    return "".join(text), calls


def final_body(
    st: State, p: GenerationRequest, out: RequestOutput, params: SamplingParams
) -> dict[str, Any]:
    base = {
        "id": p.request_id,
        "created": int(time.time()),
        "model": st.model_name,
        "usage": _usage(out),
    }
    if p.chat:
        content, calls = split_tool_calls(p, out.text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": _chat_logprobs(st, out.logprobs or []) if p.chat_logprobs else None,
            "finish_reason": chat_finish_reason(out, bool(calls)),
        }
        return {**base, "object": "chat.completion", "choices": [choice]}
    lp = _completion_logprobs(st, out.logprobs or [], 0) if params.logprobs is not None else None
    choice = {"index": 0, "text": out.text, "logprobs": lp, "finish_reason": _finish_reason(out)}
    return {**base, "object": "text_completion", "choices": [choice]}


async def stream_response(
    request: web.Request,
    st: State,
    p: GenerationRequest,
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
    start: float,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **p.response_headers,
        }
    )
    await resp.prepare(request)
    created = int(time.time())
    obj = "chat.completion.chunk" if p.chat else "text_completion"
    base = {"id": p.request_id, "object": obj, "created": created, "model": st.model_name,
            **p.response_extra}  # fmt: skip
    n_lp = 0
    text_offset = 0
    parser = output_parser(p) if p.chat else None
    called = False

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await resp.write(f"data: {data}\n\n".encode())

    try:
        if p.chat:
            await send(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        o = first
        while True:
            new_lps = (o.logprobs or [])[n_lp:]
            n_lp += len(new_lps)
            if o.delta_text or o.finished or new_lps:
                if p.chat:
                    delta: dict[str, Any] = {"content": o.delta_text} if o.delta_text else {}
                    if parser is not None:
                        events = parser.feed(o.delta_text)
                        if o.finished:
                            events += parser.finish()
                        text, calls = tool_call_deltas(events)
                        delta = {"content": text} if text else {}
                        if calls:
                            delta["tool_calls"] = calls
                            called = True
                    if parser is not None and not (delta or o.finished or new_lps):
                        o = await outputs.__anext__()  # the parser holds possible call text
                        continue
                    choice = {
                        "index": 0,
                        "delta": delta,
                        "logprobs": _chat_logprobs(st, new_lps) if p.chat_logprobs else None,
                        "finish_reason": chat_finish_reason(o, called),
                    }
                else:
                    lp = (
                        _completion_logprobs(st, new_lps, text_offset)
                        if o.logprobs is not None
                        else None
                    )
                    choice = {
                        "index": 0,
                        "text": o.delta_text,
                        "logprobs": lp,
                        "finish_reason": _finish_reason(o),
                    }
                text_offset += len(o.delta_text)
                await send({**base, "choices": [choice]})
            if o.finished:
                break
            o = await outputs.__anext__()
        record(st.metrics, p.chat, o, start)
        if p.on_done is not None:  # before [DONE]: the client may act on the calls at once
            await p.on_done(list(parser.calls) if parser is not None and called else [])
        if p.include_usage:
            await send({**base, "choices": [], "usage": _usage(o)})
        await send("[DONE]")
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client left; the finally of AsyncEngine.stream aborts the request
    except Exception as exc:
        # Headers are out: report in-band, as OpenAI does, then end the stream.
        if isinstance(exc, EngineDeadError):
            err = APIError(503, "the engine is not running", None)
        elif isinstance(exc, RequestFault):
            err = fault_error(exc)
        else:
            log.exception(json.dumps({"event": "stream_error", "request_id": p.request_id}))
            err = APIError(500, "internal server error", None)
        with contextlib.suppress(Exception):
            await send(err.body())
            await send("[DONE]")
    with contextlib.suppress(Exception):
        await resp.write_eof()
    return resp


async def close_stream(outputs: AsyncIterator[RequestOutput]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
