"""A hand-written OpenAPI 3.0 description of the routes (also drives the fuzz test)."""

from __future__ import annotations

from typing import Any

from tokencake.row_controls import MAX_LOGIT_BIAS
from tokencake.sampling_params import MAX_LOGPROBS, MAX_N
from tokencake.server.lifecycles import HEADER as LIFECYCLE_HEADER
from tokencake.server.openapi_schemas import (
    chat_properties,
    chat_schemas,
    response_body_schemas,
    responses_schemas,
)
from tokencake.server.protocol import IGNORED_FIELDS, MAX_STOP_SEQUENCES


def openapi_spec(model_name: str = "model") -> dict[str, Any]:
    """A hand-written OpenAPI 3.0 description of the routes (also drives the fuzz test)."""
    num = {"type": "number"}
    err = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    stop = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "maxItems": MAX_STOP_SEQUENCES,
            },
        ],
        "nullable": True,
    }
    common: dict[str, Any] = {
        "model": {"type": "string", "enum": [model_name]},
        "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "temperature": {**num, "minimum": 0, "maximum": 2, "nullable": True},
        "top_p": {**num, "exclusiveMinimum": True, "minimum": 0, "maximum": 1, "nullable": True},
        "top_k": {"type": "integer", "minimum": -1, "nullable": True},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "nullable": True},
        "stream": {"type": "boolean", "nullable": True},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
            "additionalProperties": False,
            "nullable": True,
        },
        "stop": stop,
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "seed": {"type": "integer", "nullable": True},
        "ignore_eos": {"type": "boolean"},
        "include_stop_str_in_output": {"type": "boolean"},
        "user": {"type": "string", "description": "accepted and ignored"},
        **{
            k: {"description": "accepted and ignored", "nullable": True}
            for k in sorted(IGNORED_FIELDS - {"user"})
        },
        "presence_penalty": {**num, "minimum": -2, "maximum": 2, "nullable": True},
        "frequency_penalty": {**num, "minimum": -2, "maximum": 2, "nullable": True},
        "repetition_penalty": {
            **num,
            "exclusiveMinimum": True,
            "minimum": 0,
            "maximum": 10,
            "nullable": True,
        },
        "min_p": {**num, "minimum": 0, "maximum": 1, "nullable": True},
        "logit_bias": {
            "type": "object",
            "description": "token id (as a string) -> bias in [-100, 100]",
            "additionalProperties": {**num, "minimum": -100, "maximum": 100},
            "maxProperties": MAX_LOGIT_BIAS,
            "nullable": True,
        },
        "request_id": {"type": "string", "minLength": 1, "maxLength": 128},
        "tokencake": {"$ref": "#/components/schemas/AgentMetadata"},
        "vllm_xargs": {
            "type": "object",
            "properties": {"tokencake": {"$ref": "#/components/schemas/AgentMetadata"}},
            "additionalProperties": False,
        },
    }
    completion = {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            **common,
            "prompt": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                ]
            },
            "logprobs": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_LOGPROBS,
                "nullable": True,
            },
            "echo": {"type": "boolean", "enum": [False]},
            "best_of": {"type": "integer", "enum": [1]},
        },
    }
    chat = {
        "type": "object",
        "required": ["messages"],
        "additionalProperties": False,
        "properties": {
            **common,
            "messages": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/ChatMessage"},
                "minItems": 1,
            },
            **chat_properties(),
            "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
            "logprobs": {"type": "boolean", "nullable": True},
            "top_logprobs": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_LOGPROBS,
                "nullable": True,
            },
            "add_generation_prompt": {"type": "boolean"},
        },
    }
    metadata = {
        "type": "object",
        "description": "Tokencake agent metadata (paper §8.1); unknown keys are ignored.",
        "properties": {
            "lifecycle_id": {"type": "string"},
            "agent_type": {"type": "string"},
            "agent_name": {"type": "string"},
            "importance": {"type": "number", "minimum": 0},
            "depth": {"type": "integer", "minimum": 0},
            "in_degree": {"type": "integer", "minimum": 0},
            "out_degree": {"type": "integer", "minimum": 0},
            "remaining_depth": {"type": "integer", "minimum": 0},
            "similarity": {"type": "number", "minimum": 0, "maximum": 1},
            "critical_path": {"type": "boolean"},
            "near_completion": {"type": "boolean"},
            "join_group": {"type": "string"},
            "application_started_at_s": {"type": "number", "minimum": 0},
            "application_start_offset_s": {"type": "number", "minimum": 0},
            "application_elapsed_s": {"type": "number", "minimum": 0},
            "application_max_depth": {"type": "integer", "minimum": 0},
            "dependency_depth": {"type": "integer", "minimum": 0},
            "fanout_width": {"type": "integer", "minimum": 1},
            "memory_weight": {"type": "number", "minimum": 0},
            "offload_eligible": {"type": "boolean"},
            "reusable_prefix": {"type": "boolean"},
        },
    }
    event = {
        "type": "object",
        "required": ["event", "lifecycle_id"],
        "additionalProperties": False,
        "properties": {
            "event": {"type": "string", "enum": ["stall_started", "stall_finished"]},
            "lifecycle_id": {"type": "string", "minLength": 1},
            "kind": {"type": "string", "minLength": 1},
            "estimated_duration_s": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string", "nullable": True},
                },
            }
        },
    }
    ok_json = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}

    def ok(schema: str, stream: str | None = None) -> dict[str, Any]:
        content: dict[str, Any] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
        }
        desc = f"a {schema}"
        if stream:
            content["text/event-stream"] = {"schema": {"type": "string", "description": stream}}
            desc += " (JSON), or an SSE stream when stream=true"
        return {"description": desc, "content": content}

    lifecycle_header = {
        LIFECYCLE_HEADER: {
            "description": "The request's tool-call lifecycle id (tc- + UUID4 hex), also in the "
            "response's tokencake field: sent when the request carries tokencake metadata "
            "(annotated) or offers tools (inferred); a conversation keeps one id",
            "schema": {"type": "string", "pattern": "^tc-[0-9a-f]{32}$"},
        }
    }

    def gen_responses(schema: str, stream: str) -> dict[str, Any]:
        return {
            "200": {**ok(schema, stream), "headers": lifecycle_header},
            "400": err,
            "401": err,
            "404": err,
            "413": err,
            "503": err,
        }

    chunks = "data: lines of ChatCompletionChunk JSON (tool calls as tool_calls deltas), then data: [DONE]"
    events = ("event:/data: lines of Responses stream events: response.created, response.in_progress, "
              "response.output_item.added, response.content_part.added, response.output_text.delta, "
              "response.output_text.done, response.content_part.done, response.function_call_arguments.delta, "
              "response.function_call_arguments.done, response.output_item.done, then response.completed "
              "(response.incomplete on max_output_tokens, response.failed on an engine error)")  # fmt: skip
    secured = [{"bearer": []}]

    def post(op_id: str, schema: str, responses: dict[str, Any], summary: str) -> dict[str, Any]:
        return {"post": {
            "operationId": op_id, "summary": summary, "security": secured,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": responses,
        }}  # fmt: skip

    return {
        "openapi": "3.0.3",
        "info": {"title": "Tokencake-JAX OpenAI-compatible server", "version": "0.1.0"},
        "paths": {
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness (no auth)",
                    "security": [],
                    "responses": {"200": ok("Health"), "503": ok("Health")},
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "summary": "The served model",
                    "security": secured,
                    "responses": {"200": ok("ModelList"), "401": err},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "security": secured,
                    "responses": {
                        "200": {
                            "description": "text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": err,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": secured,
                    "responses": {"200": ok_json, "401": err},
                }
            },
            "/v1/completions": post(
                "createCompletion",
                "CompletionRequest",
                gen_responses("Completion", "data: lines of Completion JSON, then data: [DONE]"),
                "Text completion",
            ),
            "/v1/chat/completions": post(
                "createChatCompletion",
                "ChatCompletionRequest",
                gen_responses("ChatCompletion", chunks),
                "Chat completion (tool calling included)",
            ),
            "/v1/responses": post(
                "createResponse",
                "ResponsesRequest",
                gen_responses("Response", events),
                "Responses API (function tools, previous_response_id)",
            ),
            "/v1/tokencake/events": post(
                "lifecycleEvent",
                "LifecycleEvent",
                {
                    "200": ok("LifecycleEventResult"),
                    "400": err,
                    "401": err,
                    "404": err,
                    "409": err,
                    "503": err,
                },
                "Tool-call stall started / finished",
            ),
        },  # fmt: skip
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CompletionRequest": completion,
                "ChatCompletionRequest": chat,
                "AgentMetadata": metadata,
                "LifecycleEvent": event,
                "Error": error,
                **chat_schemas(),
                **responses_schemas(),
                **response_body_schemas(),
            },
        },
    }
