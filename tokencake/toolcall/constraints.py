"""Constrained decoding for tool calls and structured output: request fields to grammar specs.

``tool_choice: "required"`` or a named function does not rely on the model following its
prompt: the request carries a :class:`tokencake.structured.ToolCallGrammar` and the sampler can
only produce ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks whose
arguments are valid for the chosen tool's schema (one block, or several when
``parallel_tool_calls`` allows). That is the Hermes format, so the Hermes parser reads it back,
whatever format the model's own template teaches; so even a 135M model emits valid calls.

``response_format`` ``json_object`` / ``json_schema`` become
:class:`~tokencake.structured.JsonObject` / :class:`~tokencake.structured.JsonSchema`.
Schemas are used with their objects closed (:func:`closed_objects`).
"""

from __future__ import annotations

import copy
from typing import Any

from tokencake.fieldpolicy import InvalidField
from tokencake.toolcall.types import ToolChoice, ToolSpec


def _structured(*names: str, param: str) -> tuple[Any, ...]:
    """The grammar specs from :mod:`tokencake.structured` (the sampler's constrained decoding);
    a build without it refuses constrained requests with a 400 instead of failing."""
    try:
        import tokencake.structured as structured
    except ImportError:
        raise InvalidField(
            f"{param}: constrained decoding is not available in this build", param
        ) from None
    return tuple(getattr(structured, n) for n in names)


def closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` whose objects that list ``properties`` without saying
    ``additionalProperties`` forbid other keys. Every output valid for the copy is valid for the
    original; the grammar just cannot wander into keys nobody declared (a weak model would
    invent them until ``max_tokens``), as OpenAI's strict mode requires anyway."""

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    out = copy.deepcopy(schema)
    close(out)
    return out


def forced_call_grammar(tools: tuple[ToolSpec, ...], choice: ToolChoice, parallel: bool) -> Any:
    """The grammar forcing a call (``required``: any tool; named: that one), else ``None``."""
    if not choice.forced:
        return None
    ToolCallGrammar, GrammarTool = _structured("ToolCallGrammar", "ToolSpec", param="tool_choice")  # noqa: N806

    chosen = [t for t in tools if choice.mode == "required" or t.name == choice.name]
    return ToolCallGrammar(
        tools=tuple(GrammarTool(t.name, closed_objects(t.parameters_schema)) for t in chosen),
        parallel=parallel and choice.mode == "required",
    )


def response_format_spec(fmt: Any, param: str = "response_format") -> Any:
    """``response_format`` as a structured-output spec (``None`` for text). Raises
    :class:`InvalidField` naming the field when malformed."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidField(f"{param} must be an object", param)
    kind = fmt.get("type")
    extra = sorted(set(fmt) - {"type", "json_schema"})
    if extra:
        raise InvalidField(f"unknown field {param}.{extra[0]}", f"{param}.{extra[0]}")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise InvalidField(
            f"{param}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            f"{param}.type",
        )
    JsonObject, JsonSchema = _structured("JsonObject", "JsonSchema", param=param)  # noqa: N806
    if kind == "json_object":
        return JsonObject()
    js = fmt.get("json_schema")
    jp = f"{param}.json_schema"
    if not isinstance(js, dict):
        raise InvalidField(f"{jp} must be an object", jp)
    extra = sorted(set(js) - {"name", "schema", "strict", "description"})
    if extra:
        raise InvalidField(f"unknown field {jp}.{extra[0]}", f"{jp}.{extra[0]}")
    if not isinstance(js.get("name", ""), str):
        raise InvalidField(f"{jp}.name must be a string", f"{jp}.name")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise InvalidField(f"{jp}.schema must be a JSON schema object", f"{jp}.schema")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidField(f"{jp}.strict must be a boolean", f"{jp}.strict")
    return JsonSchema(closed_objects(schema), strict=bool(strict))
