"""Forced tool choice through constrained decoding: the JSON schema the output must match, and
how that output is read back as tool calls.

With ``tool_choice: "required"`` or a named function the server does not hope the model follows
its prompt: it hands the sampler a JSON schema and the grammar-constrained decoder can only
produce text valid for it (so even a 135M model emits a well-formed call).

* named function ``f``: the output *is* ``f``'s arguments object (schema: ``f.parameters``).
* ``required``: the output is a JSON array of ``{"name": <one of the tools>, "arguments": {...}}``
  (at least one; exactly one when ``parallel_tool_calls`` is false). It is the Mistral array
  shape, so the Mistral parser reads it, streaming included.

No tags around the JSON: the grammar knows the output is a call, so nothing has to be detected.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from tokencake.toolcall.parser import ArgsDelta, CallEnd, CallStart, Event, ToolCallParser
from tokencake.toolcall.types import ToolCall, ToolChoice, ToolSpec, new_call_id


def forced_call_schema(
    tools: tuple[ToolSpec, ...], choice: ToolChoice, parallel: bool = True
) -> dict[str, Any] | None:
    """The JSON schema that forces a call, or ``None`` when the choice forces nothing."""
    if choice.mode == "function":
        tool = next(t for t in tools if t.name == choice.name)
        return tool.parameters_schema
    if choice.mode != "required":
        return None
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters_schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
        "minItems": 1,
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


class NamedCallParser:
    """Reads a named function's constrained output (its bare arguments object) as one call,
    with the same ``feed`` / ``finish`` / ``calls`` / ``malformed`` surface as
    :class:`ToolCallParser`."""

    def __init__(self, name: str, id_style: Literal["openai", "mistral"] = "openai") -> None:
        self.name = name
        self.id = new_call_id(id_style)
        self.calls: list[ToolCall] = []
        self.malformed = False
        self.content = ""
        self._text: list[str] = []
        self._started = False

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        if not self._started:
            self._started = True
            out.append(CallStart(0, self.id, self.name))
        if not self._text:
            text = text.lstrip()
        if text:
            self._text.append(text)
            out.append(ArgsDelta(0, text))
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if not self._started:
            out += self.feed("")
        args = "".join(self._text).rstrip()
        try:
            ok = isinstance(json.loads(args), dict)
        except ValueError:
            ok = False
        if ok:
            self.calls.append(ToolCall(self.id, self.name, args))
        else:
            self.malformed = True
        out.append(CallEnd(0))
        return out


def forced_parser(
    tools: tuple[ToolSpec, ...], choice: ToolChoice, id_style: Literal["openai", "mistral"]
) -> ToolCallParser | NamedCallParser:
    """The parser for output produced under :func:`forced_call_schema`."""
    if choice.mode == "function":
        assert choice.name is not None
        return NamedCallParser(choice.name, id_style)
    if choice.mode != "required":
        raise ValueError(f"tool_choice {choice.mode!r} does not force a call")
    return ToolCallParser("mistral", (t.name for t in tools), id_style, start="calls")
