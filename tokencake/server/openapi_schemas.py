"""OpenAPI component schemas for tool calling, the Responses API and the response bodies.

Kept apart from :mod:`tokencake.server.openapi` (the paths and request bodies) so each file
stays one readable page. Request schemas say exactly what the parsers accept; response schemas
describe what the handlers write.
"""

from __future__ import annotations

from typing import Any

from tokencake.responses_api.request import IGNORED as RESPONSES_IGNORED

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NULL_STR = {"type": "string", "nullable": True}
_SCHEMA_OBJ = {"type": "object", "description": "a JSON schema", "additionalProperties": True}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(
    props: dict[str, Any], required: list[str] | None = None, extra: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        out["required"] = required
    return out


def _ignored(names: list[str] | frozenset[str]) -> dict[str, Any]:
    return {n: {"description": "accepted and ignored", "nullable": True} for n in sorted(names)}


TEXT_PARTS = {
    "oneOf": [
        _STR,
        {"type": "array", "items": _obj({"type": {"type": "string", "enum": ["text"]}, "text": _STR}, ["type", "text"])},
    ]
}  # fmt: skip


def chat_schemas() -> dict[str, dict[str, Any]]:
    """Chat-side tool calling: messages, tools, tool choice, response format."""
    function = _obj({"name": _NAME, "description": _STR, "parameters": _SCHEMA_OBJ, "strict": {"type": "boolean"}}, ["name"])  # fmt: skip
    call = _obj(
        {"id": {"type": "string", "minLength": 1}, "type": {"type": "string", "enum": ["function"]}, "index": _INT,
         "function": _obj({"name": {"type": "string", "minLength": 1}, "arguments": _STR}, ["name"])},
        ["id", "function"],
    )  # fmt: skip
    message = _obj(
        {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {**TEXT_PARTS, "nullable": True, "description": "null only on assistant messages that call tools"},
            "name": _STR,
            "tool_calls": {"type": "array", "items": _ref("ToolCall"), "description": "assistant only"},
            "tool_call_id": {"type": "string", "minLength": 1, "description": "tool only: the call it answers"},
            "refusal": {"nullable": True, "description": "assistant only; accepted, not rendered"},
        },
        ["role"],
    )  # fmt: skip
    tool_choice = {
        "oneOf": [
            {"type": "string", "enum": ["none", "auto", "required"]},
            _obj({"type": {"type": "string", "enum": ["function"]}, "function": _obj({"name": _STR}, ["name"])}, ["type", "function"]),
        ]
    }  # fmt: skip
    response_format = {
        "oneOf": [
            _obj({"type": {"type": "string", "enum": ["text", "json_object"]}}, ["type"]),
            _obj(
                {"type": {"type": "string", "enum": ["json_schema"]},
                 "json_schema": _obj({"name": _STR, "description": _STR, "schema": _SCHEMA_OBJ, "strict": {"type": "boolean"}})},
                ["type", "json_schema"],
            ),
        ]
    }  # fmt: skip
    return {
        "ChatMessage": message,
        "ToolCall": call,
        "Tool": _obj(
            {"type": {"type": "string", "enum": ["function"]}, "function": function},
            ["type", "function"],
        ),
        "ToolChoice": tool_choice,
        "ResponseFormat": response_format,
    }


def chat_properties() -> dict[str, Any]:
    """The chat request's tool-calling properties."""
    return {
        "tools": {"type": "array", "items": _ref("Tool")},
        "tool_choice": _ref("ToolChoice"),
        "parallel_tool_calls": {"type": "boolean", "nullable": True},
        "response_format": _ref("ResponseFormat"),
    }


def responses_schemas() -> dict[str, dict[str, Any]]:
    """``POST /v1/responses``: the request and the ``Response`` object."""
    part = _obj({"type": {"type": "string", "enum": ["input_text", "output_text", "text", "refusal"]}, "text": _STR, "refusal": _STR}, ["type"], extra=True)  # fmt: skip
    item = {
        "oneOf": [
            _obj({"type": {"type": "string", "enum": ["message"]}, "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
                  "content": {"oneOf": [_STR, {"type": "array", "items": part}]}}, ["role", "content"], extra=True),
            _obj({"type": {"type": "string", "enum": ["function_call"]}, "call_id": {"type": "string", "minLength": 1},
                  "name": {"type": "string", "minLength": 1}, "arguments": _STR}, ["type", "call_id", "name", "arguments"], extra=True),
            _obj({"type": {"type": "string", "enum": ["function_call_output"]}, "call_id": {"type": "string", "minLength": 1},
                  "output": {"oneOf": [_STR, {"type": "array", "items": part}]}}, ["type", "call_id", "output"], extra=True),
            _obj({"type": {"type": "string", "enum": ["reasoning"]}}, ["type"], extra=True),
        ]
    }  # fmt: skip
    tool = _obj({"type": {"type": "string", "enum": ["function"]}, "name": _NAME, "description": _STR, "parameters": _SCHEMA_OBJ, "strict": {"type": "boolean"}}, ["type", "name"])  # fmt: skip
    fmt = {
        "oneOf": [
            _obj({"type": {"type": "string", "enum": ["text", "json_object"]}}, ["type"]),
            _obj({"type": {"type": "string", "enum": ["json_schema"]}, "name": _STR, "schema": _SCHEMA_OBJ, "strict": {"type": "boolean"}, "description": _STR}, ["type", "schema"]),
        ]
    }  # fmt: skip
    request = _obj(
        {
            "model": _STR,
            "input": {"oneOf": [_STR, {"type": "array", "items": _ref("ResponseInputItem")}]},
            "instructions": _NULL_STR,
            "previous_response_id": {**_NULL_STR, "description": "continue a stored response (404 if unknown or evicted)"},
            "tools": {"type": "array", "items": tool},
            "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, _obj({"type": {"type": "string", "enum": ["function"]}, "name": _STR}, ["type", "name"])]},
            "parallel_tool_calls": {"type": "boolean", "nullable": True},
            "max_output_tokens": {"type": "integer", "minimum": 1, "nullable": True},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
            "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1, "nullable": True},
            "stream": {"type": "boolean", "nullable": True},
            "text": _obj({"format": fmt, "verbosity": {"nullable": True}}),
            "store": {"type": "boolean", "nullable": True, "description": "keep the conversation for previous_response_id (default true)"},
            "metadata": {"type": "object", "additionalProperties": _STR, "nullable": True, "description": "echoed back"},
            "user": _NULL_STR,
            "seed": {"type": "integer", "nullable": True},
            "top_k": {"type": "integer", "minimum": -1, "nullable": True},
            "request_id": {"type": "string", "minLength": 1, "maxLength": 128},
            "tokencake": _ref("AgentMetadata"),
            "background": {"type": "boolean", "enum": [False], "nullable": True},
            **_ignored(RESPONSES_IGNORED),
        },
        ["input"],
    )  # fmt: skip
    out_item = {
        "oneOf": [
            _obj({"id": _STR, "type": {"type": "string", "enum": ["message"]}, "role": {"type": "string", "enum": ["assistant"]}, "status": _STR,
                  "content": {"type": "array", "items": _obj({"type": {"type": "string", "enum": ["output_text"]}, "text": _STR, "annotations": {"type": "array", "items": {}}, "logprobs": {"type": "array", "items": {}}}, ["type", "text"])}},
                 ["id", "type", "role", "status", "content"]),
            _obj({"id": _STR, "type": {"type": "string", "enum": ["function_call"]}, "call_id": _STR, "name": _STR, "arguments": _STR, "status": _STR},
                 ["id", "type", "call_id", "name", "arguments", "status"]),
        ]
    }  # fmt: skip
    usage = _obj({"input_tokens": _INT, "output_tokens": _INT, "total_tokens": _INT, "input_tokens_details": _obj({"cached_tokens": _INT}, extra=True), "output_tokens_details": _obj({"reasoning_tokens": _INT})}, ["input_tokens", "output_tokens", "total_tokens"])  # fmt: skip
    response = _obj(
        {
            "id": _STR, "object": {"type": "string", "enum": ["response"]}, "created_at": {"type": "number"},
            "status": {"type": "string", "enum": ["completed", "incomplete", "in_progress", "failed"]},
            "model": _STR, "output": {"type": "array", "items": out_item}, "usage": {**usage, "nullable": True},
            "incomplete_details": {**_obj({"reason": _STR}), "nullable": True}, "error": {"type": "object", "nullable": True},
        },
        ["id", "object", "created_at", "status", "model", "output"],
        extra=True,
    )  # fmt: skip
    return {"ResponsesRequest": request, "ResponseInputItem": item, "Response": response}


def response_body_schemas() -> dict[str, dict[str, Any]]:
    """What the other routes answer (JSON bodies; streams are SSE of the chunk shapes)."""
    usage = _obj({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT, "prompt_tokens_details": _obj({"cached_tokens": _INT})}, ["prompt_tokens", "completion_tokens", "total_tokens"])  # fmt: skip
    finish = {
        "type": "string",
        "enum": ["stop", "length", "tool_calls", "abort", None],
        "nullable": True,
    }
    # the request's tool-call lifecycle (issue 14): its id, and whether hints or the protocol gave it
    lifecycle = _obj({"lifecycle_id": _STR, "source": {"type": "string", "enum": ["inferred", "annotated"]}}, ["lifecycle_id"])  # fmt: skip
    chat_msg = _obj({"role": {"type": "string", "enum": ["assistant"]}, "content": _NULL_STR, "tool_calls": {"type": "array", "items": _ref("ToolCall")}}, ["role", "content"])  # fmt: skip
    chat = _obj(
        {"id": _STR, "object": {"type": "string", "enum": ["chat.completion"]}, "created": _INT, "model": _STR, "usage": usage, "tokencake": lifecycle,
         "choices": {"type": "array", "items": _obj({"index": _INT, "message": chat_msg, "logprobs": {"type": "object", "nullable": True}, "finish_reason": finish}, ["index", "message", "finish_reason"])}},
        ["id", "object", "created", "model", "choices"],
    )  # fmt: skip
    delta_call = _obj({"index": _INT, "id": _STR, "type": {"type": "string", "enum": ["function"]}, "function": _obj({"name": _STR, "arguments": _STR})}, ["index"])  # fmt: skip
    chunk = _obj(
        {"id": _STR, "object": {"type": "string", "enum": ["chat.completion.chunk"]}, "created": _INT, "model": _STR, "usage": usage, "tokencake": lifecycle,
         "choices": {"type": "array", "items": _obj({"index": _INT, "delta": _obj({"role": _STR, "content": _STR, "tool_calls": {"type": "array", "items": delta_call}}),
                                                      "logprobs": {"type": "object", "nullable": True}, "finish_reason": finish}, ["index", "delta"])}},
        ["id", "object", "created", "model", "choices"],
    )  # fmt: skip
    completion = _obj(
        {"id": _STR, "object": {"type": "string", "enum": ["text_completion"]}, "created": _INT, "model": _STR, "usage": usage, "tokencake": lifecycle,
         "choices": {"type": "array", "items": _obj({"index": _INT, "text": _STR, "logprobs": {"type": "object", "nullable": True}, "finish_reason": finish}, ["index", "text"])}},
        ["id", "object", "model", "choices"],
    )  # fmt: skip
    models = _obj({"object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": _obj({"id": _STR, "object": _STR, "created": _INT, "owned_by": _STR, "max_model_len": _INT}, ["id", "object"])}}, ["object", "data"])  # fmt: skip
    return {
        "ChatCompletion": chat,
        "ChatCompletionChunk": chunk,
        "Completion": completion,
        "ModelList": models,
        "Health": _obj({"status": _STR, "reason": _STR}, ["status"]),
        "LifecycleEventResult": _obj(
            {"lifecycle_id": _STR, "event": _STR, "disposition": _STR, "error": {"type": "object"}},
            ["lifecycle_id", "event", "disposition"],
            extra=True,
        ),
    }
