"""OpenAI-compatible HTTP server (aiohttp) with the Tokencake metadata extension and events.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (plain
JSON or SSE streams; tool calling and structured output), ``POST /v1/responses`` (the Responses
API over the same pipeline), ``POST /v1/tokencake/events`` (tool-lifecycle ``stall_started`` /
``stall_finished``), ``GET /metrics`` (Prometheus), ``GET /health`` and ``GET /openapi.json``.

Modules: ``body`` (reading a JSON body) and ``protocol`` (JSON bodies -> typed requests),
``errors`` (the HTTP error body and the one map from typed rejections), ``app`` (middleware,
handlers, generation), ``responses`` (JSON bodies and SSE), ``responses_route``
(``/v1/responses``), ``openapi`` / ``openapi_schemas``, ``metrics``, ``state``,
``connections`` (timeouts, connection cap), ``listen`` (the socket, bound before the model
loads) and ``run`` (serving, ``BackgroundServer``). One request's path from here to its sampled
token (six files) is the README's "Follow a request".

Rules the handlers keep:

* Every refusal is an OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``
  and a 4xx that names the offending field; nothing a client sends can produce a 500.
* Unexpected failures become a sanitized 500 (the details go to the log, not the client) and the
  server keeps serving.
* A client that goes away (mid-stream or while waiting) aborts its request, which frees its KV
  blocks: the handler task is cancelled and leaving ``AsyncEngine.stream`` aborts.
* The server reaches the engine only through ``AsyncEngine``'s named methods (``stream``,
  ``tokenize``, ``tokenize_chat``, ``token_texts``, ``kv_stats``, ``lifecycle_event``,
  ``alive``, ``info``); prompts are tokenized on the engine thread.
* Bad input found anywhere (protocol, sampling parameters, engine, scheduler, metadata,
  lifecycle) is a typed refusal (``APIError`` / ``RequestRejected``), answered by the middleware
  in one place; nothing chooses a status by reading a message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Lazy exports (as in ``tokencake/__init__``): ``tokencake serve`` checks its port through
# ``tokencake.server.listen`` before anything imports JAX.
_EXPORTS = {
    "lifecycle_handler": "tokencake.async_engine",
    "JsonFormatter": "tokencake.logs",
    "setup_json_logging": "tokencake.logs",
    "DEFAULT_MAX_BODY_BYTES": "tokencake.server.app",
    "build_app": "tokencake.server.app",
    "APIError": "tokencake.server.errors",
    "openapi_spec": "tokencake.server.openapi",
    "PortUnavailableError": "tokencake.server.listen",
    "listen_socket": "tokencake.server.listen",
    "BackgroundServer": "tokencake.server.run",
    "run_server": "tokencake.server.run",
    "start_site": "tokencake.server.run",
}

if TYPE_CHECKING:
    from tokencake.async_engine import lifecycle_handler
    from tokencake.logs import JsonFormatter, setup_json_logging
    from tokencake.server.app import DEFAULT_MAX_BODY_BYTES, build_app
    from tokencake.server.errors import APIError
    from tokencake.server.listen import PortUnavailableError, listen_socket
    from tokencake.server.openapi import openapi_spec
    from tokencake.server.run import BackgroundServer, run_server, start_site

__all__ = [
    "APIError",
    "BackgroundServer",
    "DEFAULT_MAX_BODY_BYTES",
    "JsonFormatter",
    "PortUnavailableError",
    "build_app",
    "lifecycle_handler",
    "listen_socket",
    "openapi_spec",
    "run_server",
    "setup_json_logging",
    "start_site",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokencake.server' has no attribute {name!r}")
