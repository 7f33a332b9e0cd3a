"""Responses API output: the ``Response`` object, its output items, and the streaming events.

:class:`ResponseEvents` turns the tool-call parser's events (text deltas, call start, argument
deltas, call end) into the event sequence OpenAI's Responses stream has and the Agents SDK
consumes::

    response.created, response.in_progress,
    [response.output_item.added (message), response.content_part.added,
     response.output_text.delta*, response.output_text.done, response.content_part.done,
     response.output_item.done]
    [response.output_item.added (function_call), response.function_call_arguments.delta*,
     response.function_call_arguments.done, response.output_item.done]*,
    response.completed | response.incomplete

each with a growing ``sequence_number``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from tokencake.toolcall.parser import ArgsDelta, CallEnd, CallStart, Event, TextDelta
from tokencake.toolcall.types import ToolCall


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_object(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content if status == "completed" else [],
    }


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(
    content: str | None, calls: tuple[ToolCall, ...] | list[ToolCall]
) -> list[dict[str, Any]]:
    """A finished generation's output items: the message (if any text), then the calls."""
    items = [message_item(_item_id("msg"), content)] if content else []
    items += [function_call_item(_item_id("fc"), c.id, c.name, c.arguments) for c in calls]
    return items


def assistant_message(
    content: str | None, calls: list[ToolCall] | tuple[ToolCall, ...]
) -> dict[str, Any]:
    """The chat message a response adds to its conversation (for ``previous_response_id``)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        msg["tool_calls"] = [c.openai() for c in calls]
    elif msg["content"] is None:
        msg["content"] = ""
    return msg


def response_object(
    response_id: str,
    model: str,
    created_at: float,
    echo: dict[str, Any],
    output: list[dict[str, Any]],
    status: str,
    usage: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
) -> dict[str, Any]:
    """The ``Response`` object (fields the request set are echoed from ``echo``)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "truncation": "disabled",
        "reasoning": None,
        "usage": usage,
        **echo,
    }


def finish_status(finish_reason: str | None) -> tuple[str, str | None]:
    """``(status, incomplete reason)`` for an engine finish reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


class ResponseEvents:
    """Builds one streamed response's events from parser events."""

    def __init__(self, response_id: str, model: str, echo: dict[str, Any]) -> None:
        self.id = response_id
        self.model = model
        self.echo = echo
        self.created_at = time.time()
        self.output: list[dict[str, Any]] = []  # finished items, in order
        self._seq = 0
        self._msg: dict[str, Any] | None = None  # the open message item
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # parser index -> open function_call item
        self._args: dict[int, list[str]] = {}
        self._index: dict[int, int] = {}  # parser index -> output_index

    def _ev(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return ev

    def _snapshot(
        self, status: str, usage: Any = None, reason: str | None = None
    ) -> dict[str, Any]:
        return response_object(
            self.id,
            self.model,
            self.created_at,
            self.echo,
            list(self.output),
            status,
            usage,
            reason,
        )

    def start(self) -> list[dict[str, Any]]:
        snap = self._snapshot("in_progress")
        return [
            self._ev("response.created", response=snap),
            self._ev("response.in_progress", response=snap),
        ]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(event, TextDelta):
            if not event.text:
                return out
            if self._msg is None:
                self._msg = message_item(_item_id("msg"), "", status="in_progress")
                idx = len(self.output)
                out.append(self._ev("response.output_item.added", output_index=idx, item=self._msg))
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                out.append(self._ev("response.content_part.added", item_id=self._msg["id"], output_index=idx, content_index=0, part=part))  # fmt: skip
            self._text.append(event.text)
            out.append(self._ev("response.output_text.delta", item_id=self._msg["id"], output_index=len(self.output), content_index=0, delta=event.text, logprobs=[]))  # fmt: skip
        elif isinstance(event, CallStart):
            out += self._close_message()
            item = function_call_item(_item_id("fc"), event.id, event.name, "", "in_progress")
            self._calls[event.index] = item
            self._args[event.index] = []
            self._index[event.index] = len(self.output) + len(self._calls) - 1
            out.append(self._ev("response.output_item.added", output_index=self._index[event.index], item=dict(item)))  # fmt: skip
        elif isinstance(event, ArgsDelta):
            item = self._calls[event.index]
            self._args[event.index].append(event.text)
            out.append(self._ev("response.function_call_arguments.delta", item_id=item["id"], output_index=self._index[event.index], delta=event.text))  # fmt: skip
        elif isinstance(event, CallEnd):
            item = self._calls.pop(event.index, None)
            if item is None:
                return out
            args = "".join(self._args.pop(event.index))
            done = {**item, "arguments": args, "status": "completed"}
            idx = self._index[event.index]
            out.append(self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx, name=item["name"], arguments=args))  # fmt: skip
            out.append(self._ev("response.output_item.done", output_index=idx, item=done))
            self.output.append(done)
        return out

    def _close_message(self) -> list[dict[str, Any]]:
        if self._msg is None:
            return []
        text = "".join(self._text)
        idx = len(self.output)
        done = message_item(self._msg["id"], text)
        part = done["content"][0]
        iid = self._msg["id"]
        evs = [
            self._ev("response.output_text.done", item_id=iid, output_index=idx, content_index=0, text=text, logprobs=[]),
            self._ev("response.content_part.done", item_id=iid, output_index=idx, content_index=0, part=part),
            self._ev("response.output_item.done", output_index=idx, item=done),
        ]  # fmt: skip
        self.output.append(done)
        self._msg, self._text = None, []
        return evs

    def finish(
        self, finish_reason: str | None, usage: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """Close what is open and end with ``response.completed`` (``.incomplete`` on length)."""
        out = self._close_message()
        status, reason = finish_status(finish_reason)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._ev(kind, response=self._snapshot(status, usage, reason)))
        return out

    def failed(self, message: str) -> dict[str, Any]:
        """A ``response.failed`` event (the stream broke after it began)."""
        snap = self._snapshot("failed")
        snap["error"] = {"code": "server_error", "message": message}
        return self._ev("response.failed", response=snap)
