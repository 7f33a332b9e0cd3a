"""Typed tool-calling request pieces: tool definitions, the tool choice and tool calls.

These are the OpenAI Chat Completions shapes (``tools``, ``tool_choice``, ``parallel_tool_calls``,
assistant ``tool_calls``), parsed once into frozen dataclasses. Malformed input raises
:class:`InvalidToolRequest`, which names the offending field so the HTTP layer can answer 400.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal

from tokencake.fieldpolicy import InvalidField

_ALNUM = string.ascii_letters + string.digits


class InvalidToolRequest(InvalidField):
    """A tool-calling field is malformed; ``param`` is its JSON path (``tools[0].function``)."""


@dataclass(frozen=True)
class ToolSpec:
    """One callable function offered to the model."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (object); None = no arguments
    strict: bool = False

    def openai(self) -> dict[str, Any]:
        """The Chat Completions ``tools[]`` entry (what chat templates expect)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters_schema
        return {"type": "function", "function": fn}

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' JSON schema (an empty object schema when none was given)."""
        return (
            self.parameters if self.parameters is not None else {"type": "object", "properties": {}}
        )


Mode = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class ToolChoice:
    """``none`` / ``auto`` / ``required``, or ``function`` with the forced function's ``name``."""

    mode: Mode = "auto"
    name: str | None = None

    @property
    def parses_calls(self) -> bool:
        """Whether the model's output is searched for tool calls (not for ``none``)."""
        return self.mode != "none"

    @property
    def forced(self) -> bool:
        """Whether the output must be a tool call (``required`` or a named function)."""
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        """The Chat Completions ``message.tool_calls[]`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id(style: Literal["openai", "mistral"] = "openai") -> str:
    """A fresh tool-call id: OpenAI's ``call_`` + 24 characters, or Mistral's 9 alphanumerics
    (Mistral chat templates refuse any other length)."""
    n = 9 if style == "mistral" else 24
    body = "".join(secrets.choice(_ALNUM) for _ in range(n))
    return body if style == "mistral" else "call_" + body


def _str(v: Any, param: str, required: bool = True) -> str | None:
    if v is None and not required:
        return None
    if not isinstance(v, str) or (required and not v):
        raise InvalidToolRequest(f"{param} must be a non-empty string", param)
    return v


def parse_tool(obj: Any, param: str, flat: bool = False) -> ToolSpec:
    """One ``tools[]`` entry. ``flat`` reads the Responses API shape (``{"type": "function",
    "name", "parameters", ...}``) instead of Chat Completions' ``{"type", "function": {...}}``."""
    if not isinstance(obj, dict):
        raise InvalidToolRequest(f"{param} must be an object", param)
    if obj.get("type") != "function":
        raise InvalidToolRequest(
            f"{param}.type must be 'function' (got {obj.get('type')!r}); only function tools are supported",
            f"{param}.type",
        )
    if flat:
        fn, fparam = obj, param
        allowed = {"type", "name", "description", "parameters", "strict"}
    else:
        fn, fparam = obj.get("function"), f"{param}.function"
        extra = sorted(set(obj) - {"type", "function"})
        if extra:
            raise InvalidToolRequest(f"unknown field {param}.{extra[0]}", f"{param}.{extra[0]}")
        if not isinstance(fn, dict):
            raise InvalidToolRequest(f"{fparam} must be an object", fparam)
        allowed = {"name", "description", "parameters", "strict"}
    extra = sorted(set(fn) - allowed)
    if extra:
        raise InvalidToolRequest(f"unknown field {fparam}.{extra[0]}", f"{fparam}.{extra[0]}")
    name = _str(fn.get("name"), f"{fparam}.name")
    assert name is not None
    if not all(c in _ALNUM + "_-." for c in name) or len(name) > 64:
        raise InvalidToolRequest(
            f"{fparam}.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}",
            f"{fparam}.name",
        )
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidToolRequest(
            f"{fparam}.parameters must be a JSON schema object", f"{fparam}.parameters"
        )
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidToolRequest(f"{fparam}.strict must be a boolean", f"{fparam}.strict")
    return ToolSpec(
        name=name,
        description=_str(fn.get("description"), f"{fparam}.description", required=False),
        parameters=params,
        strict=bool(strict),
    )


def parse_tools(v: Any, param: str = "tools", flat: bool = False) -> tuple[ToolSpec, ...]:
    """The ``tools`` list (``None`` or ``[]`` -> no tools; the Agents SDK sends ``[]``).
    Names must be unique."""
    if v is None:
        return ()
    if not isinstance(v, list):
        raise InvalidToolRequest(f"{param} must be a list", param)
    tools = tuple(parse_tool(t, f"{param}[{i}]", flat) for i, t in enumerate(v))
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if t.name in seen:
            raise InvalidToolRequest(f"duplicate tool name {t.name!r}", f"{param}[{i}]")
        seen.add(t.name)
    return tools


def parse_tool_choice(
    v: Any, tools: tuple[ToolSpec, ...], param: str = "tool_choice", flat: bool = False
) -> ToolChoice:
    """``tool_choice``: absent -> ``auto`` with tools, ``none`` without (OpenAI's defaults)."""
    if v is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise InvalidToolRequest(
                f"{param} must be 'none', 'auto', 'required' or a named function, got {v!r}", param
            )
        if v != "none" and not tools:
            raise InvalidToolRequest(f"{param}={v!r} needs a non-empty tools list", param)
        return ToolChoice(v)  # type: ignore[arg-type]
    if not isinstance(v, dict) or v.get("type") != "function":
        raise InvalidToolRequest(f"{param} must be a string or {{'type': 'function', ...}}", param)
    if flat:  # Responses: {"type": "function", "name": ...}
        name = _str(v.get("name"), f"{param}.name")
    else:
        fn = v.get("function")
        if not isinstance(fn, dict):
            raise InvalidToolRequest(f"{param}.function must be an object", f"{param}.function")
        name = _str(fn.get("name"), f"{param}.function.name")
    if name not in {t.name for t in tools}:
        raise InvalidToolRequest(f"{param} names {name!r}, which is not in tools", param)
    return ToolChoice("function", name)


def parse_call(obj: Any, param: str) -> ToolCall:
    """An assistant message's ``tool_calls[]`` entry from a client's history."""
    if not isinstance(obj, dict):
        raise InvalidToolRequest(f"{param} must be an object", param)
    extra = sorted(set(obj) - {"id", "type", "function", "index"})
    if extra:
        raise InvalidToolRequest(f"unknown field {param}.{extra[0]}", f"{param}.{extra[0]}")
    if obj.get("type", "function") != "function":
        raise InvalidToolRequest(f"{param}.type must be 'function'", f"{param}.type")
    call_id = _str(obj.get("id"), f"{param}.id")
    fn = obj.get("function")
    if not isinstance(fn, dict):
        raise InvalidToolRequest(f"{param}.function must be an object", f"{param}.function")
    name = _str(fn.get("name"), f"{param}.function.name")
    args = fn.get("arguments", "{}")
    if isinstance(args, dict):  # some clients send the object itself
        args = json.dumps(args)
    if not isinstance(args, str):
        raise InvalidToolRequest(
            f"{param}.function.arguments must be a JSON string", f"{param}.function.arguments"
        )
    assert call_id is not None and name is not None
    return ToolCall(call_id, name, args)
