"""Chat messages with tool calls: validation, normalisation and the conversation's tool history.

A conversation is a list of OpenAI chat messages. Tool calling adds two shapes: an assistant
message with ``tool_calls`` (its ``content`` may be ``null``) and a ``tool`` message answering
one call by ``tool_call_id``. :func:`parse_messages` validates all of it once and returns
:class:`ChatMessage` records plus a :class:`ToolHistory` that says which calls were made and
which have results (what the lifecycle inference of issue 14 keys on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokencake.toolcall.types import InvalidToolRequest, ToolCall, parse_call

ROLES = ("system", "developer", "user", "assistant", "tool")
_FIELDS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    # refusal / audio / function_call are echoes of earlier responses; accepted and not rendered.
    "assistant": {"role", "content", "name", "tool_calls", "refusal", "audio", "function_call"},
    "tool": {"role", "content", "tool_call_id", "name"},
}


@dataclass(frozen=True)
class ChatMessage:
    """One validated message; ``content`` is text (text parts joined, ``null`` -> ``""``)."""

    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ToolHistory:
    """The tool calls a conversation made and answered.

    ``calls`` maps every call id in assistant ``tool_calls`` to its function name, in order;
    ``results`` lists the ids answered by ``tool`` messages; ``pending`` the calls of the last
    assistant message that no ``tool`` message answers yet.
    """

    calls: dict[str, str] = field(default_factory=dict)
    results: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    last_results: tuple[str, ...] = ()  # ids answered by the trailing run of tool messages

    @property
    def returning(self) -> bool:
        """The request carries tool results for the latest calls (a return from a tool)."""
        return bool(self.last_results)


def _text(content: Any, param: str, nullable: bool) -> str:
    if content is None:
        if nullable:
            return ""
        raise InvalidToolRequest(f"{param} is required", param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            # "output_text"/"input_text" parts come from Responses-API-shaped histories.
            ok = (
                isinstance(p, dict)
                and p.get("type") in ("text", "input_text", "output_text")
                and isinstance(p.get("text"), str)
            )
            if not ok:
                raise InvalidToolRequest(
                    f"{param}[{j}] must be a {{'type': 'text', 'text': str}} part", f"{param}[{j}]"
                )
            parts.append(p["text"])
        return "".join(parts)
    raise InvalidToolRequest(f"{param} must be a string or a list of text parts", param)


def parse_messages(v: Any, param: str = "messages") -> tuple[list[ChatMessage], ToolHistory]:
    """Validate ``messages``; every failure raises :class:`InvalidToolRequest` naming the field."""
    if not isinstance(v, list) or not v:
        raise InvalidToolRequest(f"{param} must be a non-empty list", param)
    out: list[ChatMessage] = []
    calls: dict[str, str] = {}
    results: list[str] = []
    for i, m in enumerate(v):
        mp = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise InvalidToolRequest(f"{mp} must be an object", mp)
        role = m.get("role")
        if role not in ROLES:
            raise InvalidToolRequest(f"{mp}.role must be one of {', '.join(ROLES)}", f"{mp}.role")
        extra = sorted(set(m) - _FIELDS[role])
        if extra:
            raise InvalidToolRequest(
                f"unsupported field(s) for a {role} message: "
                + ", ".join(f"{mp}.{k}" for k in extra),
                f"{mp}.{extra[0]}",
            )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidToolRequest(f"{mp}.name must be a string", f"{mp}.name")
        tool_calls: tuple[ToolCall, ...] = ()
        tool_call_id = None
        if role == "assistant" and m.get("tool_calls") is not None:
            tc = m["tool_calls"]
            if not isinstance(tc, list):
                raise InvalidToolRequest(f"{mp}.tool_calls must be a list", f"{mp}.tool_calls")
            tool_calls = tuple(parse_call(c, f"{mp}.tool_calls[{j}]") for j, c in enumerate(tc))
            for c in tool_calls:
                calls[c.id] = c.name
        if role == "tool":
            tool_call_id = m.get("tool_call_id")
            if not isinstance(tool_call_id, str) or not tool_call_id:
                raise InvalidToolRequest(
                    f"{mp}.tool_call_id must be a non-empty string", f"{mp}.tool_call_id"
                )
            if tool_call_id not in calls:
                raise InvalidToolRequest(
                    f"{mp}.tool_call_id {tool_call_id!r} answers no earlier assistant tool call",
                    f"{mp}.tool_call_id",
                )
            results.append(tool_call_id)
        # Assistant messages that only call tools carry content null (OpenAI's own shape).
        content = _text(m.get("content"), f"{mp}.content", nullable=role == "assistant")
        out.append(ChatMessage(role, content, name, tool_calls, tool_call_id))
    return out, _history(out, calls, results)


def _history(msgs: list[ChatMessage], calls: dict[str, str], results: list[str]) -> ToolHistory:
    trailing: list[str] = []
    for m in reversed(msgs):
        if m.role != "tool":
            break
        assert m.tool_call_id is not None
        trailing.append(m.tool_call_id)
    last_calls: tuple[str, ...] = ()
    for m in reversed(msgs):
        if m.role == "assistant":
            last_calls = tuple(c.id for c in m.tool_calls)
            break
    answered = set(results)
    return ToolHistory(
        calls=calls,
        results=tuple(results),
        pending=tuple(c for c in last_calls if c not in answered),
        last_results=tuple(reversed(trailing)),
    )
