"""Response bodies: OpenAI JSON completions, usage, logprobs, and SSE streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
    parsed or none is well-formed (the client then sees what the model wrote)."""
    parser = output_parser(p)
    if parser is None:
        return text, []
    parser.feed(text)
    parser.finish()
    if not parser.calls:
        return text, []
    # Complete calls stand even if a later one was cut off (max_tokens): the streamed answer
    # delivered them too. Only the broken call's fragment is dropped.
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


def _usage_n(outs: list[RequestOutput]) -> dict[str, Any]:
    """Usage of all choices: the prompt once, every choice's completion tokens."""
    u = _usage(outs[0])
    u["completion_tokens"] = sum(len(o.token_ids) for o in outs)
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    return u


def final_body(
    st: State, p: GenerationRequest, outs: list[RequestOutput], params: SamplingParams
) -> dict[str, Any]:
    """The JSON answer; ``outs`` are the finished choices in index order (``n`` of them)."""
    base = {
        "id": p.request_id,
        "created": int(time.time()),
        "model": st.model_name,
        "usage": _usage_n(outs),
    }
    choices: list[dict[str, Any]] = []
    for out in outs:
        if p.chat:
            content, calls = split_tool_calls(p, out.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
            choices.append({
                "index": out.index,
                "message": message,
                "logprobs": _chat_logprobs(st, out.logprobs or []) if p.chat_logprobs else None,
                "finish_reason": chat_finish_reason(out, bool(calls)),
            })  # fmt: skip
        else:
            lp = (
                _completion_logprobs(st, out.logprobs or [], 0)
                if params.logprobs is not None
                else None
            )
            choices.append({"index": out.index, "text": out.text, "logprobs": lp, "finish_reason": _finish_reason(out)})  # fmt: skip
    obj = "chat.completion" if p.chat else "text_completion"
    return {**base, "object": obj, "choices": choices}


@dataclass
class _ChoiceStream:
    """One choice's progress in a stream (``n > 1`` interleaves several)."""

    parser: ToolCallParser | None
    n_lp: int = 0
    text_offset: int = 0
    called: bool = False


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
    choices: dict[int, _ChoiceStream] = {}
    finals: dict[int, RequestOutput] = {}

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await resp.write(f"data: {data}\n\n".encode())

    try:
        o = first
        while True:
            c = choices.get(o.index)
            if c is None:
                c = choices[o.index] = _ChoiceStream(output_parser(p) if p.chat else None)
                if p.chat:
                    role = {"role": "assistant", "content": ""}
                    await send({**base, "choices": [{"index": o.index, "delta": role, "logprobs": None, "finish_reason": None}]})  # fmt: skip
            chunk = _chunk(st, p, c, o)
            if chunk is not None:
                await send({**base, "choices": [chunk]})
            if o.finished:
                finals[o.index] = o
            if o.request_finished:
                break
            o = await outputs.__anext__()
        outs = [finals[i] for i in sorted(finals)] or [o]
        record_choices(st.metrics, p.chat, outs, start)
        if p.on_done is not None:  # before [DONE]: the client may act on the calls at once
            made = [
                c for ch in choices.values() if ch.called and ch.parser for c in ch.parser.calls
            ]
            await p.on_done(made)
        if p.include_usage:
            await send({**base, "choices": [], "usage": _usage_n(outs)})
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


def _chunk(
    st: State, p: GenerationRequest, c: _ChoiceStream, o: RequestOutput
) -> dict[str, Any] | None:
    """One stream chunk's choice for output ``o`` (None when there is nothing to send yet)."""
    new_lps = (o.logprobs or [])[c.n_lp :]
    c.n_lp += len(new_lps)
    if not (o.delta_text or o.finished or new_lps):
        return None
    if not p.chat:
        lp = _completion_logprobs(st, new_lps, c.text_offset) if o.logprobs is not None else None
        c.text_offset += len(o.delta_text)
        return {"index": o.index, "text": o.delta_text, "logprobs": lp, "finish_reason": _finish_reason(o)}  # fmt: skip
    delta: dict[str, Any] = {"content": o.delta_text} if o.delta_text else {}
    if c.parser is not None:
        events = c.parser.feed(o.delta_text)
        if o.finished:
            events += c.parser.finish()
        text, calls = tool_call_deltas(events)
        delta = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
            c.called = True
        if not (delta or o.finished or new_lps):
            return None  # the parser holds text that may start a call
    return {
        "index": o.index,
        "delta": delta,
        "logprobs": _chat_logprobs(st, new_lps) if p.chat_logprobs else None,
        "finish_reason": chat_finish_reason(o, c.called),
    }


def record_choices(m: Any, chat: bool, outs: list[RequestOutput], start: float) -> None:
    """Metrics of a finished request: the prompt once, every choice's tokens and reason."""
    record(m, chat, outs[0], start)
    for o in outs[1:]:
        m.generation_tokens.inc(len(o.token_ids))
        m.finished.labels(o.finish_reason or "unknown").inc()


async def close_stream(outputs: AsyncIterator[RequestOutput]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
