"""``POST /v1/responses`` requests translated into the Chat Completions request they mean.

The Responses API is a different spelling of the same generation: ``input`` items become chat
messages (``function_call`` items an assistant turn's ``tool_calls``, ``function_call_output``
items ``tool`` messages), ``instructions`` a leading system message, flat function ``tools`` the
nested chat shape, ``text.format`` ``response_format``, ``max_output_tokens``
``max_completion_tokens``. The server then validates and runs that chat body through the one chat
pipeline, so both endpoints behave the same.

Accepted and ignored (nothing to do for a local model): ``include``, ``reasoning``, ``metadata``
(echoed back), ``user``, ``service_tier``, ``truncation``, ``prompt_cache_key``,
``prompt_cache_retention``, ``prompt_cache_options``, ``safety_identifier``,
``context_management``. Refused unless absent/neutral: ``background`` (true), ``conversation``,
``prompt``, ``top_logprobs``, ``max_tool_calls``; input images/files and hosted tools (only
function tools run here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokencake.fieldpolicy import InvalidField, unknown_fields
from tokencake.responses_api.store import ResponseStore
from tokencake.toolcall.types import ToolSpec, parse_tool_choice, parse_tools

HANDLED = frozenset({
    "model", "input", "instructions", "previous_response_id", "tools", "tool_choice",
    "parallel_tool_calls", "max_output_tokens", "temperature", "top_p", "stream", "text", "store",
    "metadata", "user",
    # Tokencake extensions, as on the chat endpoint
    "tokencake", "vllm_xargs", "request_id", "seed", "top_k",
})  # fmt: skip
IGNORED = frozenset({
    "include", "reasoning", "service_tier", "truncation", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "safety_identifier", "context_management",
    "stream_options",
})  # fmt: skip
# Accepted only when absent (null) or, for background, false.
NEUTRAL = frozenset({"background", "conversation", "prompt", "top_logprobs", "max_tool_calls"})
ALLOWED = HANDLED | IGNORED | NEUTRAL
_PASS_THROUGH = ("model", "temperature", "top_p", "tokencake", "vllm_xargs", "request_id", "seed", "top_k", "user", "metadata")  # fmt: skip


class UnknownResponse(LookupError):
    """``previous_response_id`` names no stored response (never stored, or evicted)."""

    param = "previous_response_id"


@dataclass(frozen=True)
class ResponsesRequest:
    """A translated Responses request.

    ``chat_body`` is the equivalent Chat Completions body (validated by the chat pipeline);
    ``history`` the conversation without ``instructions`` (what :class:`ResponseStore` keeps);
    ``message_params`` the Responses JSON path behind each chat message, to rename errors.
    """

    chat_body: dict[str, Any]
    history: list[dict[str, Any]]
    message_params: list[str]
    tools: tuple[ToolSpec, ...]
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the Response repeats
    store: bool = True
    stream: bool = False


def _neutral(body: dict[str, Any]) -> None:
    for k in sorted(NEUTRAL):
        v = body.get(k)
        if v is None or (k == "background" and v is False):
            continue
        raise InvalidField(f"{k} is not supported by this server", k)


def _text_parts(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidField(f"{param} must be a string or a list of content parts", param)
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            out.append(p["text"])
        elif kind == "refusal":
            continue  # an echoed refusal adds nothing to the prompt
        else:
            raise InvalidField(
                f"{param}[{j}]: only text content parts are supported (got type {kind!r})",
                f"{param}[{j}]",
            )
    return "".join(out)


def input_messages(items: Any, param: str = "input") -> tuple[list[dict[str, Any]], list[str]]:
    """Responses ``input`` as chat messages, plus the input path behind each message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}], [param]
    if not isinstance(items, list):
        raise InvalidField(f"{param} must be a string or a list of items", param)
    msgs: list[dict[str, Any]] = []
    params: list[str] = []
    for i, it in enumerate(items):
        ip = f"{param}[{i}]"
        if not isinstance(it, dict):
            raise InvalidField(f"{ip} must be an object", ip)
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidField(
                    f"{ip}.role must be user, assistant, system or developer", f"{ip}.role"
                )
            msgs.append({"role": role, "content": _text_parts(it.get("content"), f"{ip}.content")})
            params.append(ip)
        elif kind == "function_call":
            call_id, name = it.get("call_id"), it.get("name")
            args = it.get("arguments", "{}")
            for key, v in (("call_id", call_id), ("name", name), ("arguments", args)):
                if not isinstance(v, str) or (key != "arguments" and not v):
                    raise InvalidField(f"{ip}.{key} must be a non-empty string", f"{ip}.{key}")
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            prev = msgs[-1] if msgs else None
            # Calls following an assistant turn belong to it (one chat turn: text + calls).
            if prev is not None and prev["role"] == "assistant":
                prev.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
                params.append(ip)
        elif kind == "function_call_output":
            call_id, output = it.get("call_id"), it.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidField(f"{ip}.call_id must be a non-empty string", f"{ip}.call_id")
            if not isinstance(output, str):
                output = _text_parts(output, f"{ip}.output")
            msgs.append({"role": "tool", "tool_call_id": call_id, "content": output})
            params.append(ip)
        elif kind == "reasoning":
            continue  # reasoning summaries from other models are not replayed
        else:
            raise InvalidField(
                f"{ip}.type {kind!r} is not supported (message, function_call, "
                "function_call_output and reasoning items are)",
                f"{ip}.type",
            )
    return msgs, params


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidField("text must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidField("text.format must be an object", "text.format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise InvalidField(
                "text.format.schema must be a JSON schema object", "text.format.schema"
            )
        inner = {"name": fmt.get("name") or "response", "schema": schema}
        if fmt.get("strict") is not None:
            inner["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": inner}
    raise InvalidField(
        "text.format.type must be text, json_object or json_schema", "text.format.type"
    )


def parse_responses_request(
    body: Any, store: ResponseStore, *, lenient: bool = False
) -> ResponsesRequest:
    """Translate a Responses body. Raises :class:`InvalidField` (400) or
    :class:`UnknownResponse` (404, unknown ``previous_response_id``)."""
    if not isinstance(body, dict):
        raise InvalidField("request body must be a JSON object", None)
    unknown_fields(body, ALLOWED, lenient=lenient)
    _neutral(body)
    if body.get("input") is None:
        raise InvalidField("input is required", "input")
    history: list[dict[str, Any]] = []
    params: list[str] = []
    prev_id = body.get("previous_response_id")
    if prev_id is not None:
        if not isinstance(prev_id, str) or not prev_id:
            raise InvalidField(
                "previous_response_id must be a non-empty string", "previous_response_id"
            )
        stored = store.get(prev_id)
        if stored is None:
            raise UnknownResponse(f"previous response {prev_id!r} not found (unknown or evicted)")
        history, params = stored, ["previous_response_id"] * len(stored)
    new, new_params = input_messages(body["input"])
    history += new
    params += new_params
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidField("instructions must be a string", "instructions")
    messages = list(history)
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
        params.insert(0, "instructions")
    tools = parse_tools(body.get("tools"), "tools", flat=True)
    choice = parse_tool_choice(body.get("tool_choice"), tools, "tool_choice", flat=True)
    chat: dict[str, Any] = {k: body[k] for k in _PASS_THROUGH if body.get(k) is not None}
    chat["messages"] = messages
    if tools:
        chat["tools"] = [t.openai() for t in tools]
        chat["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}}
            if choice.mode == "function"
            else choice.mode
        )
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidField("stream must be a boolean", "stream")
    store_flag = body.get("store")
    if store_flag is not None and not isinstance(store_flag, bool):
        raise InvalidField("store must be a boolean", "store")
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    echo = {
        "instructions": instructions,
        "metadata": body.get("metadata") or {},
        "previous_response_id": prev_id,
        "tools": [
            {"type": "function", **t.openai()["function"], "strict": t.strict} for t in tools
        ],
        "tool_choice": body.get("tool_choice") or ("auto" if tools else "none"),
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "user": body.get("user"),
        "store": store_flag is not False,
    }
    return ResponsesRequest(
        chat_body=chat,
        history=json.loads(json.dumps(history)),  # a private copy for the store
        message_params=params,
        tools=tools,
        echo=echo,
        store=store_flag is not False,
        stream=bool(stream),
    )


def rename_param(param: str | None, req: ResponsesRequest) -> str | None:
    """Map a chat-body error path (``messages[3].content``) back to the Responses request."""
    if param is None:
        return None
    renames = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format"}
    for chat, resp in renames.items():
        if param == chat or param.startswith(chat + "."):
            return resp + param[len(chat) :]
    if param.startswith("messages["):
        end = param.index("]")
        i = int(param[len("messages[") : end])
        if 0 <= i < len(req.message_params):
            rest = param[end + 1 :]
            if rest == ".tool_call_id":  # a function_call_output item's field
                return req.message_params[i] + ".call_id"
            return req.message_params[i]
    if param.startswith("tools[") and ".function" in param:
        return param.replace(".function", "", 1)
    return param
