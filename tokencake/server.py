"""OpenAI-compatible HTTP server (aiohttp) with the Tokencake metadata extension and events.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (plain
JSON or SSE streams), ``POST /v1/tokencake/events`` (tool-lifecycle ``stall_started`` /
``stall_finished``), ``GET /metrics`` (Prometheus), ``GET /health`` and ``GET /openapi.json``.

Rules the handlers keep:

* Every refusal is an OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``
  and a 4xx that names the offending field; nothing a client sends can produce a 500.
* Unexpected failures become a sanitized 500 (the details go to the log, not the client) and the
  server keeps serving.
* A client that goes away (mid-stream or while waiting) aborts its request, which frees its KV
  blocks: the handler task is cancelled and leaving ``AsyncEngine.stream`` aborts.
* All tokenization runs on the engine thread (``AsyncEngine.call``): the tokenizer is not shared
  across threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tokencake.async_engine import AsyncEngine, EngineDeadError
from tokencake.config import EngineConfig
from tokencake.outputs import RequestOutput, TokenLogprob
from tokencake.sampling_params import MAX_LOGPROBS, SamplingParams

log = logging.getLogger("tokencake.server")

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
MAX_STOP_SEQUENCES = 16
_ENGINE_KEY = web.AppKey("engine", AsyncEngine)
_STATE_KEY = web.AppKey("state", object)
_REQUEST_ID_KEY = web.RequestKey("tc_request_id", str)

# Event dispositions (see scheduler/lifecycle) -> HTTP status, as in the paper's protocol (§8.2).
DISPOSITION_STATUS = {
    "applied": 200,
    "duplicate": 200,
    "late_finish": 200,
    "unknown": 404,
    "conflict": 409,
    "invalid": 400,
    "unavailable": 503,
}


# ---- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    """A refusal with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


def _bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param)


# ---- request body validation -------------------------------------------------------------------
class _Fields:
    """Typed access to a JSON object's fields; every failure is a 400 naming the field.

    ``null`` counts as absent, as OpenAI clients treat it.
    """

    def __init__(self, body: Any, allowed: frozenset[str], prefix: str = "") -> None:
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object", prefix.rstrip(".") or None)
        unknown = sorted(k for k in body if k not in allowed)
        if unknown:
            raise _bad(f"unknown or unsupported field {prefix + unknown[0]!r}", prefix + unknown[0])
        self.body = body
        self.prefix = prefix

    def has(self, name: str) -> bool:
        return self.body.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.body.get(name)

    def integer(
        self, name: str, lo: int | None = None, hi: int | None = None, default: int | None = None
    ) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():  # JSON writers may emit 16.0
                v = int(v)
            else:
                raise _bad(f"{self.prefix}{name} must be an integer", self.prefix + name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _bad(
                f"{self.prefix}{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}",
                self.prefix + name,
            )
        return v

    def number(
        self, name: str, lo: float, hi: float, default: float, lo_open: bool = False
    ) -> float:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(f"{self.prefix}{name} must be a number", self.prefix + name)
        if v > hi or v < lo or (lo_open and v == lo):
            span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise _bad(f"{self.prefix}{name} must be in {span}, got {v}", self.prefix + name)
        return float(v)

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise _bad(f"{self.prefix}{name} must be a boolean", self.prefix + name)
        return v

    def string(self, name: str, default: str | None = None) -> str | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise _bad(f"{self.prefix}{name} must be a string", self.prefix + name)
        return v

    def obj(self, name: str) -> dict[str, Any] | None:
        v = self.body.get(name)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise _bad(f"{self.prefix}{name} must be an object", self.prefix + name)
        return v

    def neutral(self, name: str, neutral: tuple[Any, ...]) -> None:
        """Accept a field only at a value that changes nothing (unsupported features)."""
        v = self.body.get(name)
        # bool is an int in Python: keep True from passing for 1 and False for 0.
        if v is not None and not any(
            v == n and isinstance(v, bool) == isinstance(n, bool) for n in neutral
        ):
            raise _bad(f"{self.prefix}{name}={v!r} is not supported", self.prefix + name)


_COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "stop", "stop_token_ids", "seed", "ignore_eos", "include_stop_str_in_output", "user",
    "presence_penalty", "frequency_penalty", "logit_bias", "tokencake", "vllm_xargs", "request_id",
})  # fmt: skip
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
    "add_generation_prompt",
}  # fmt: skip


@dataclass
class _Parsed:
    """A validated generation request, before tokenization."""

    request_id: str
    stream: bool
    include_usage: bool
    params: dict[str, Any]  # SamplingParams kwargs except max_tokens
    max_tokens: int | None
    max_tokens_param: str
    metadata: Any
    chat: bool
    chat_logprobs: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True


def _parse_common(f: _Fields, chat: bool, model_name: str) -> _Parsed:
    model = f.string("model")
    if model is not None and model != model_name:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {model_name!r}",
            "model",
            code="model_not_found",
        )
    n = f.integer("n", 1)
    if n not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    f.neutral("presence_penalty", (0,))
    f.neutral("frequency_penalty", (0,))
    f.neutral("logit_bias", ({},))
    f.string("user")
    stream = f.boolean("stream")
    include_usage = False
    opts = f.obj("stream_options")
    if opts is not None:
        if not stream:
            raise _bad("stream_options is only allowed with stream=true", "stream_options")
        include_usage = _Fields(
            opts, frozenset({"include_usage", "continuous_usage_stats"}), "stream_options."
        ).boolean("include_usage")
    stop = f.raw("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise _bad(f"stop allows at most {MAX_STOP_SEQUENCES} sequences", "stop")
    stop_ids = f.raw("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids
    ):
        raise _bad("stop_token_ids must be a list of non-negative integers", "stop_token_ids")
    seed = f.integer("seed")
    params: dict[str, Any] = {
        "temperature": f.number("temperature", 0.0, 2.0, 1.0),
        "top_p": f.number("top_p", 0.0, 1.0, 1.0, lo_open=True),
        "top_k": _top_k(f),
        # OpenAI seeds are 64-bit; the engine's are 31-bit, so fold (deterministically).
        "seed": None if seed is None else seed % 2**31,
        "stop": tuple(stop),
        "stop_token_ids": tuple(stop_ids),
        "ignore_eos": f.boolean("ignore_eos"),
        "include_stop_str_in_output": f.boolean("include_stop_str_in_output"),
    }
    if chat:
        mt_param = "max_completion_tokens" if f.has("max_completion_tokens") else "max_tokens"
    else:
        mt_param = "max_tokens"
    max_tokens = f.integer(mt_param, 1)
    metadata, meta_id = _parse_metadata(f)
    request_id = f.string("request_id")
    if request_id is not None and not (0 < len(request_id) <= 128):
        raise _bad("request_id must be 1-128 characters", "request_id")
    if meta_id is not None and request_id is not None and meta_id != request_id:
        raise _bad("tokencake.lifecycle_id must equal request_id", "tokencake.lifecycle_id")
    rid = request_id or meta_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    return _Parsed(rid, stream, include_usage, params, max_tokens, mt_param, metadata, chat)


def _top_k(f: _Fields) -> int:
    k = f.integer("top_k", -1)
    return 0 if k is None or k == -1 else k  # vLLM spells "disabled" as -1


def _parse_metadata(f: _Fields) -> tuple[Any, str | None]:
    """Agent metadata from ``tokencake`` or ``vllm_xargs.tokencake`` (the authors' client)."""
    direct = f.raw("tokencake")
    param = "tokencake"
    xargs = f.raw("vllm_xargs")
    if xargs is not None:
        xf = _Fields(xargs, frozenset({"tokencake"}), "vllm_xargs.")
        if xf.has("tokencake"):
            if direct is not None:
                raise _bad(
                    "give agent metadata in tokencake or vllm_xargs.tokencake, not both",
                    "vllm_xargs.tokencake",
                )
            direct, param = xf.raw("tokencake"), "vllm_xargs.tokencake"
    if direct is None:
        return None, None
    if isinstance(direct, str):  # vllm_xargs values are sometimes JSON-encoded strings
        try:
            direct = json.loads(direct)
        except ValueError:
            raise _bad(f"{param} must be a JSON object", param) from None
    if not isinstance(direct, dict):
        raise _bad(f"{param} must be an object", param)
    lifecycle_id = direct.get("lifecycle_id")
    if lifecycle_id is not None and not isinstance(lifecycle_id, str):
        raise _bad(f"{param}.lifecycle_id must be a string", f"{param}.lifecycle_id")
    from_dict = _metadata_parser()
    if from_dict is None:
        return dict(direct), lifecycle_id
    try:
        return from_dict(direct), lifecycle_id
    except (ValueError, TypeError) as exc:
        raise _bad(f"{param}: {exc}", _metadata_param(param, str(exc), direct)) from None


def _metadata_parser() -> Callable[[dict[str, Any]], Any] | None:
    try:
        from tokencake.scheduler.metadata import AgentMetadata
    except ImportError:  # metadata support not installed: pass the dict through untouched
        return None
    # Over HTTP the wire format is enforced: lifecycle_id = "tc-" + UUID4 hex (paper §8.1).
    return functools.partial(AgentMetadata.from_dict, strict_lifecycle_id=True)


def _metadata_param(param: str, message: str, body: dict[str, Any]) -> str:
    """Name the metadata field an error is about (messages say ``field 'name'``)."""
    m = re.search(r"field '(\w+)'", message)
    if m:
        return f"{param}.{m.group(1)}"
    for key in sorted(body, key=len, reverse=True):
        if key in message:
            return f"{param}.{key}"
    return param


def _parse_completion(body: Any, model_name: str) -> _Parsed:
    f = _Fields(body, _COMPLETION_FIELDS)
    p = _parse_common(f, chat=False, model_name=model_name)
    f.neutral("echo", (False,))
    f.neutral("best_of", (1,))
    f.neutral("suffix", ("",))
    lp = f.integer("logprobs", 0, MAX_LOGPROBS)
    p.params["logprobs"] = lp
    prompt = f.raw("prompt")
    if prompt is None:
        raise _bad("prompt is required", "prompt")
    # One prompt only: a string, a token list, or a batch of exactly one of those.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, (str, list)) for t in prompt):
        raise _bad("only one prompt per request is supported", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt must not be empty", "prompt")
    elif isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _bad("prompt must be a string or a non-empty list of token ids", "prompt")
    else:
        raise _bad("prompt must be a string or a list of token ids", "prompt")
    p.prompt = prompt
    return p


def _parse_chat(body: Any, model_name: str) -> _Parsed:
    f = _Fields(body, _CHAT_FIELDS)
    p = _parse_common(f, chat=True, model_name=model_name)
    fmt = f.obj("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("only response_format {'type': 'text'} is supported", "response_format")
    p.chat_logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not p.chat_logprobs:
        raise _bad("top_logprobs requires logprobs=true", "top_logprobs")
    p.params["logprobs"] = (top or 0) if p.chat_logprobs else None
    p.add_generation_prompt = f.boolean("add_generation_prompt", True)
    messages = f.raw("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise _bad(
                f"messages[{i}].role must be one of system, user, assistant, developer, tool",
                f"messages[{i}].role",
            )
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _bad(f"unsupported field messages[{i}].{extra[0]}", f"messages[{i}].{extra[0]}")
        content = m.get("content")
        ok = isinstance(content, str) or (
            isinstance(content, list)
            and all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) and set(c) <= {"type", "text"} for c in content)
        )  # fmt: skip
        if not ok:
            raise _bad(
                f"messages[{i}].content must be a string or a list of text parts",
                f"messages[{i}].content",
            )
        if m.get("name") is not None and not isinstance(m.get("name"), str):
            raise _bad(f"messages[{i}].name must be a string", f"messages[{i}].name")
    p.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return p


# ---- metrics -----------------------------------------------------------------------------------
class _Metrics:
    """Prometheus collectors on a registry private to one app (tests build many apps)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokencake_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokencake_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "tokencake_generation_tokens", "Generated tokens.", registry=r
        )
        self.cached_tokens = Counter(
            "tokencake_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache.",
            registry=r,
        )
        self.finished = Counter(
            "tokencake_requests_finished",
            "Generation requests by finish reason.",
            ["reason"],
            registry=r,
        )
        self.events = Counter(
            "tokencake_lifecycle_events",
            "Lifecycle events by event and disposition.",
            ["event", "disposition"],
            registry=r,
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram(
            "tokencake_request_latency_seconds",
            "End-to-end generation latency.",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.ttft = Histogram(
            "tokencake_time_to_first_token_seconds",
            "Time to first token.",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.in_flight = Gauge(
            "tokencake_requests_in_flight", "Generation requests being served.", registry=r
        )
        self.kv_capacity = Gauge(
            "tokencake_kv_blocks_capacity", "Usable device KV blocks.", registry=r
        )
        self.kv_used = Gauge(
            "tokencake_kv_blocks_used", "Device KV blocks owned by live requests.", registry=r
        )
        self.kv_cached = Gauge(
            "tokencake_kv_blocks_cached", "Evictable prefix-cache blocks.", registry=r
        )
        self.kv_usage = Gauge(
            "tokencake_kv_usage_ratio", "Fraction of device KV blocks in use.", registry=r
        )
        self.waiting = Gauge(
            "tokencake_scheduler_waiting", "Requests waiting for admission.", registry=r
        )
        self.running = Gauge("tokencake_scheduler_running", "Requests running.", registry=r)
        self.engine_up = Gauge(
            "tokencake_engine_up", "1 while the engine thread serves.", registry=r
        )


def _kv_snapshot(engine: Any) -> dict[str, float]:
    pool = engine.pool
    cap = pool.capacity
    return {
        "capacity": cap,
        "used": pool.num_used,
        "cached": pool.num_cached,
        "usage": pool.num_used / cap if cap else 0.0,
        "waiting": len(engine.scheduler.waiting),
        "running": len(engine.scheduler.running),
    }


# ---- app state ---------------------------------------------------------------------------------
class _State:
    """Per-app mutable state: in-flight bookkeeping for draining, metrics, settings."""

    def __init__(
        self,
        engine: AsyncEngine,
        api_key: str | None,
        max_tokens_limit: int | None,
        drain_timeout_s: float,
        max_body_bytes: int,
    ) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.drain_timeout_s = drain_timeout_s
        self.metrics = _Metrics()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self.model_name = engine.engine.model_name
        self.max_model_len = engine.engine.max_model_len
        pool = engine.engine.pool
        # The most tokens one sequence can ever hold in KV: bounds the default max_tokens too.
        self.max_seq_tokens = min(self.max_model_len, pool.capacity * pool.block_size)
        self.vocab_size = engine.engine.model_config.vocab_size
        self.created = int(time.time())

    def begin(self) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.set(self.in_flight)

    def end(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self.idle.set()

    def engine_alive(self) -> bool:
        e = self.engine
        return e.error is None and e._thread.is_alive()


def _state(request: web.Request) -> _State:
    return request.app[_STATE_KEY]  # type: ignore[return-value]


# ---- middlewares -------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_and_logs(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI-style error; log one JSON line per request."""
    start = time.perf_counter()
    st = _state(request)
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except APIError as exc:
        status = exc.status
        return exc.response()
    except web.HTTPException as exc:
        status = exc.status
        if exc.status == 413:
            return APIError(
                413, f"request body exceeds the {st.max_body_bytes} byte limit", None
            ).response()
        if exc.status < 400:
            raise
        return APIError(exc.status, exc.reason, None).response()
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # client went away (nginx's spelling); nothing to answer
        raise
    except EngineDeadError:
        status = 503
        log.error(json.dumps({"event": "engine_dead", "path": request.path}))
        return APIError(503, "the engine is not running", None).response()
    except Exception:
        log.exception(
            json.dumps({"event": "internal_error", "method": request.method, "path": request.path})
        )
        return APIError(500, "internal server error", None).response()
    finally:
        route = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "unmatched"
        )
        st.metrics.requests.labels(route, str(status)).inc()
        log.info(json.dumps({
            "event": "request", "method": request.method, "path": request.path, "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 2),
            "request_id": request.get(_REQUEST_ID_KEY),
        }))  # fmt: skip


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = _state(request).api_key
    if key and request.path != "/health":
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(401, "missing or invalid API key", None, code="invalid_api_key")
    return await handler(request)


# ---- handlers ----------------------------------------------------------------------------------
async def _json_body(request: web.Request) -> Any:
    limit = _state(request).max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"request body exceeds the {limit} byte limit", None)
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad("request body is not valid JSON", None) from None


async def health(request: web.Request) -> web.Response:
    st = _state(request)
    if not st.engine_alive():
        return web.json_response({"status": "error", "reason": "engine stopped"}, status=503)
    if st.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    st = _state(request)
    card = {
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "tokencake",
        "max_model_len": st.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def metrics(request: web.Request) -> web.Response:
    st = _state(request)
    m = st.metrics
    m.engine_up.set(1 if st.engine_alive() else 0)
    with contextlib.suppress(EngineDeadError, TimeoutError):  # serve stale gauges, not an error
        snap = await asyncio.wait_for(st.engine.call(_kv_snapshot), timeout=5.0)
        m.kv_capacity.set(snap["capacity"])
        m.kv_used.set(snap["used"])
        m.kv_cached.set(snap["cached"])
        m.kv_usage.set(snap["usage"])
        m.waiting.set(snap["waiting"])
        m.running.set(snap["running"])
    return web.Response(
        body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(_state(request).model_name))


async def completions(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    p = _parse_completion(await _json_body(request), st.model_name)
    return await _generate(request, st, p)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    p = _parse_chat(await _json_body(request), st.model_name)
    return await _generate(request, st, p)


async def events(request: web.Request) -> web.Response:
    """``stall_started`` / ``stall_finished`` (paper §8.2); the engine owns the state machine."""
    st = _state(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None)
    ev = body.get("event")
    if ev not in ("stall_started", "stall_finished"):
        raise _bad("event must be 'stall_started' or 'stall_finished'", "event")
    allowed = {"event", "lifecycle_id"} | (
        {"kind", "estimated_duration_s"} if ev == "stall_started" else set()
    )
    extra = sorted(set(body) - allowed)
    if extra:
        raise _bad(f"unknown field {extra[0]!r} for {ev}", extra[0])
    if not isinstance(body.get("lifecycle_id"), str) or not body["lifecycle_id"]:
        raise _bad("lifecycle_id must be a non-empty string", "lifecycle_id")
    if "kind" in body and (not isinstance(body["kind"], str) or not body["kind"]):
        raise _bad("kind must be a non-empty string", "kind")
    if "estimated_duration_s" in body:
        d = body["estimated_duration_s"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise _bad(
                "estimated_duration_s must be a finite number > 0 (omit it rather than send null)",
                "estimated_duration_s",
            )
    request[_REQUEST_ID_KEY] = body["lifecycle_id"]

    def apply(engine: Any) -> tuple[str, dict[str, Any]]:
        fn = lifecycle_handler(engine)
        if fn is None:
            return "unavailable", {"error": "lifecycle events are not supported by this engine"}
        disposition, out = fn(dict(body))
        return str(getattr(disposition, "value", disposition)), dict(out or {})

    try:
        disposition, out = await asyncio.wait_for(st.engine.call(apply), timeout=30.0)
    except (ValueError, TypeError) as exc:
        named = [k for k in sorted(body, key=len, reverse=True) if k in str(exc)]
        raise _bad(str(exc), named[0] if named else "lifecycle_id") from None
    except TimeoutError:
        raise APIError(503, "the engine did not answer in time", None) from None
    st.metrics.events.labels(ev, disposition).inc()
    status = DISPOSITION_STATUS.get(disposition)
    if status is None:
        raise RuntimeError(f"engine returned unknown disposition {disposition!r}")
    detail = out.pop("error", None) or out.pop("message", None)
    payload = {**out, "lifecycle_id": body["lifecycle_id"], "event": ev, "disposition": disposition}
    if status >= 400:
        message = str(detail or _EVENT_MESSAGES.get(disposition) or f"{ev}: {disposition}")
        param = re.search(r"field '(\w+)'", message) if status == 400 else None
        err = APIError(
            status,
            message,
            param.group(1) if param else "lifecycle_id" if status in (404, 409) else None,
            code=disposition,
        )
        return web.json_response({**payload, **err.body()}, status=status)
    return web.json_response(payload, status=status)


_EVENT_MESSAGES = {
    "unknown": "unknown lifecycle_id (never seen, or its record expired)",
    "conflict": "the event conflicts with the lifecycle's state (a different start, or a finish without a start)",
    "unavailable": "lifecycle events are unavailable",
}


def lifecycle_handler(engine: Any) -> Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]] | None:
    """The engine's lifecycle-event entry point (on the engine, else on its scheduler)."""
    fn = getattr(engine, "lifecycle_event", None)
    if fn is None:
        fn = getattr(getattr(engine, "scheduler", None), "lifecycle_event", None)
    return fn


# ---- generation --------------------------------------------------------------------------------
async def _tokenize(st: _State, p: _Parsed) -> list[int]:
    """Token ids of the prompt, computed on the engine thread (which owns the tokenizer)."""
    param = "messages" if p.chat else "prompt"

    def run(engine: Any) -> list[int]:
        if p.chat:
            return list(
                engine.tokenizer.apply_chat_template(
                    p.messages, add_generation_prompt=p.add_generation_prompt
                )
            )
        if isinstance(p.prompt, str):
            return list(engine.tokenizer.encode(p.prompt))
        ids = list(p.prompt)  # type: ignore[arg-type]
        vocab = engine.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return ids

    try:
        return await st.engine.call(run)
    except (ValueError, TypeError, jinja2.TemplateError) as exc:
        # Chat templates reject some conversations themselves (e.g. roles that must alternate).
        raise _bad(f"{param}: {exc}", param) from None


def _sampling(st: _State, p: _Parsed, n_prompt: int) -> SamplingParams:
    prompt_param = "messages" if p.chat else "prompt"
    room = st.max_seq_tokens - n_prompt
    if room < 1:
        raise _bad(
            f"this model's maximum context length is {st.max_seq_tokens} tokens; the prompt has {n_prompt} tokens, leaving no room to generate",
            prompt_param,
        )
    max_tokens = p.max_tokens if p.max_tokens is not None else room
    if st.max_tokens_limit is not None:
        if p.max_tokens is not None and max_tokens > st.max_tokens_limit:
            raise _bad(
                f"{p.max_tokens_param} must be at most {st.max_tokens_limit}", p.max_tokens_param
            )
        max_tokens = min(max_tokens, st.max_tokens_limit)
    if max_tokens > room:
        raise _bad(
            f"this model's maximum context length is {st.max_seq_tokens} tokens; the prompt has {n_prompt} tokens and {p.max_tokens_param}={max_tokens} asks for more than the {room} left",
            p.max_tokens_param,
        )
    kw = dict(p.params)
    if kw["top_k"] >= st.vocab_size:
        # Keeping every token is "no top-k"; and the engine's int32 sampler must never see a
        # client's 2**40 (it would take the engine thread down).
        kw["top_k"] = 0
    try:
        return SamplingParams(max_tokens=max_tokens, **kw)
    except ValueError as exc:
        raise _bad(str(exc), None) from None


async def _generate(request: web.Request, st: _State, p: _Parsed) -> web.StreamResponse:
    if st.draining:
        raise APIError(503, "the server is shutting down", None)
    if not st.engine_alive():
        raise EngineDeadError("engine stopped")
    request[_REQUEST_ID_KEY] = p.request_id
    st.begin()
    outputs: AsyncIterator[RequestOutput] | None = None
    try:
        token_ids = await _tokenize(st, p)
        if not token_ids:
            raise _bad("the prompt is empty after tokenization", "messages" if p.chat else "prompt")
        params = _sampling(st, p, len(token_ids))
        start = time.perf_counter()
        outputs = _open_stream(st, p, token_ids, params)
        first = await _first(
            outputs, p
        )  # add_request's refusals surface here, before any byte is sent
        if p.stream:
            return await _stream_response(request, st, p, outputs, first, start)
        final = first
        async for out in outputs:
            final = out
        _record(st, p, final, start)
        return web.json_response(_final_body(st, p, final, params))
    finally:
        if outputs is not None:
            await _close(outputs)  # aborts the request unless it finished
        st.end()


def _open_stream(
    st: _State, p: _Parsed, token_ids: list[int], params: SamplingParams
) -> AsyncIterator[RequestOutput]:
    return st.engine.stream(
        token_ids, params, request_id=p.request_id, metadata=p.metadata
    ).__aiter__()


async def _first(outputs: AsyncIterator[RequestOutput], p: _Parsed) -> RequestOutput:
    try:
        return await outputs.__anext__()
    except ValueError as exc:
        msg = str(exc)
        if "duplicate request id" in msg:
            raise APIError(409, msg, "request_id", code="duplicate_request_id") from None
        if "KV blocks" in msg or "max_tokens" in msg or "context" in msg:
            raise _bad(msg, p.max_tokens_param) from None
        if "metadata" in msg or "lifecycle" in msg:
            raise _bad(msg, "tokencake") from None
        raise _bad(msg, "messages" if p.chat else "prompt") from None
    except TypeError as exc:
        raise _bad(str(exc), "messages" if p.chat else "prompt") from None


def _record(st: _State, p: _Parsed, final: RequestOutput, start: float) -> None:
    route = "chat" if p.chat else "completions"
    m = st.metrics
    m.prompt_tokens.inc(len(final.prompt_token_ids))
    m.generation_tokens.inc(len(final.token_ids))
    m.cached_tokens.inc(final.num_cached_tokens)
    m.finished.labels(final.finish_reason or "unknown").inc()
    m.latency.labels(route).observe(time.perf_counter() - start)
    if "ttft_s" in final.metrics:
        m.ttft.labels(route).observe(final.metrics["ttft_s"])


def _usage(out: RequestOutput) -> dict[str, Any]:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }


def _token_text(st: _State, tid: int) -> str:
    # A read-only decode; the engine thread only decodes too, so sharing is safe.
    return st.engine.engine.tokenizer.decode([int(tid)])


def _completion_logprobs(st: _State, lps: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
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


def _chat_logprobs(st: _State, lps: list[TokenLogprob]) -> dict[str, Any]:
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


def _final_body(
    st: _State, p: _Parsed, out: RequestOutput, params: SamplingParams
) -> dict[str, Any]:
    base = {
        "id": p.request_id,
        "created": int(time.time()),
        "model": st.model_name,
        "usage": _usage(out),
    }
    if p.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": _chat_logprobs(st, out.logprobs or []) if p.chat_logprobs else None,
            "finish_reason": _finish_reason(out),
        }
        return {**base, "object": "chat.completion", "choices": [choice]}
    lp = _completion_logprobs(st, out.logprobs or [], 0) if params.logprobs is not None else None
    choice = {"index": 0, "text": out.text, "logprobs": lp, "finish_reason": _finish_reason(out)}
    return {**base, "object": "text_completion", "choices": [choice]}


async def _stream_response(
    request: web.Request,
    st: _State,
    p: _Parsed,
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
    start: float,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    created = int(time.time())
    obj = "chat.completion.chunk" if p.chat else "text_completion"
    base = {"id": p.request_id, "object": obj, "created": created, "model": st.model_name}
    n_lp = 0
    text_offset = 0

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await resp.write(f"data: {data}\n\n".encode())

    try:
        if p.chat:
            await send(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        o = first
        while True:
            new_lps = (o.logprobs or [])[n_lp:]
            n_lp += len(new_lps)
            if o.delta_text or o.finished or new_lps:
                if p.chat:
                    choice = {
                        "index": 0,
                        "delta": {"content": o.delta_text} if o.delta_text else {},
                        "logprobs": _chat_logprobs(st, new_lps) if p.chat_logprobs else None,
                        "finish_reason": _finish_reason(o),
                    }
                else:
                    lp = (
                        _completion_logprobs(st, new_lps, text_offset)
                        if o.logprobs is not None
                        else None
                    )
                    choice = {
                        "index": 0,
                        "text": o.delta_text,
                        "logprobs": lp,
                        "finish_reason": _finish_reason(o),
                    }
                text_offset += len(o.delta_text)
                await send({**base, "choices": [choice]})
            if o.finished:
                break
            o = await outputs.__anext__()
        _record(st, p, o, start)
        if p.include_usage:
            await send({**base, "choices": [], "usage": _usage(o)})
        await send("[DONE]")
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client left; the finally of AsyncEngine.stream aborts the request
    except Exception as exc:
        # Headers are out: report in-band, as OpenAI does, then end the stream.
        if isinstance(exc, EngineDeadError):
            err = APIError(503, "the engine is not running", None)
        else:
            log.exception(json.dumps({"event": "stream_error", "request_id": p.request_id}))
            err = APIError(500, "internal server error", None)
        with contextlib.suppress(Exception):
            await send(err.body())
            await send("[DONE]")
    with contextlib.suppress(Exception):
        await resp.write_eof()
    return resp


async def _close(outputs: AsyncIterator[RequestOutput]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


# ---- app ---------------------------------------------------------------------------------------
def build_app(
    async_engine: AsyncEngine,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_limit: int | None = None,
    drain_timeout_s: float = 30.0,
) -> web.Application:
    """The aiohttp application over a running :class:`AsyncEngine`.

    ``api_key`` (when set) is required as ``Authorization: Bearer <key>`` on every route but
    ``/health``. ``max_tokens_limit`` caps a request's generation budget. On shutdown the app
    refuses new generations and waits up to ``drain_timeout_s`` for in-flight ones; the caller
    owns the engine and shuts it down after the app.
    """
    app = web.Application(middlewares=[_errors_and_logs, _auth], client_max_size=max_body_bytes)
    app[_ENGINE_KEY] = async_engine
    app[_STATE_KEY] = _State(
        async_engine, api_key, max_tokens_limit, drain_timeout_s, max_body_bytes
    )
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/tokencake/events", events)
    app.on_shutdown.append(_drain)
    return app


async def _drain(app: web.Application) -> None:
    st: _State = app[_STATE_KEY]  # type: ignore[assignment]
    st.draining = True
    log.info(json.dumps({"event": "draining", "in_flight": st.in_flight}))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(st.idle.wait(), st.drain_timeout_s)


async def start_site(
    app: web.Application, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 60.0
) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner (``await runner.cleanup()`` drains and stops)
    and the bound port (useful with ``port=0``).

    Handlers are cancelled when their client disconnects: that is what aborts an abandoned
    generation and frees its blocks.
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port  # type: ignore[union-attr]
    return runner, bound


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages that already are JSON objects are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        try:
            parsed = json.loads(msg)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            entry.update(parsed)
        else:
            entry["message"] = msg
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run_server(
    engine_config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    **app_options: Any,
) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then drain in-flight requests and stop."""
    from tokencake.engine import LLMEngine

    setup_json_logging()
    engine = AsyncEngine(LLMEngine(engine_config))

    async def main() -> None:
        app = build_app(engine, api_key, **app_options)
        runner, bound = await start_site(app, host, port)
        log.info(
            json.dumps(
                {
                    "event": "listening",
                    "host": host,
                    "port": bound,
                    "model": engine.engine.model_name,
                    "auth": bool(api_key),
                }
            )
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(json.dumps({"event": "shutdown"}))
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


# ---- OpenAPI -----------------------------------------------------------------------------------
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
        "n": {"type": "integer", "enum": [1], "nullable": True},
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
        "user": {"type": "string"},
        "presence_penalty": {"type": "number", "enum": [0]},
        "frequency_penalty": {"type": "number", "enum": [0]},
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
    message = {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {
            "role": {
                "type": "string",
                "enum": ["system", "user", "assistant", "developer", "tool"],
            },
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {
                                "type": {"type": "string", "enum": ["text"]},
                                "text": {"type": "string"},
                            },
                            "additionalProperties": False,
                        },
                    },
                ]
            },
            "name": {"type": "string"},
        },
    }
    chat = {
        "type": "object",
        "required": ["messages"],
        "additionalProperties": False,
        "properties": {
            **common,
            "messages": {"type": "array", "items": message, "minItems": 1},
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
    gen_responses = {
        "200": {"description": "a completion (JSON) or an SSE stream when stream=true", "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}},
        "400": err, "401": err, "404": err, "413": err, "503": err,
    }  # fmt: skip
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
                    "responses": {"200": ok_json, "503": ok_json},
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "summary": "The served model",
                    "security": secured,
                    "responses": {"200": ok_json, "401": err},
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
                "createCompletion", "CompletionRequest", gen_responses, "Text completion"
            ),
            "/v1/chat/completions": post(
                "createChatCompletion", "ChatCompletionRequest", gen_responses, "Chat completion"
            ),
            "/v1/tokencake/events": post(
                "lifecycleEvent",
                "LifecycleEvent",
                {"200": ok_json, "400": err, "401": err, "404": err, "409": err, "503": err},
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
            },
        },
    }


class BackgroundServer:
    """Serve an app on a private event loop in a daemon thread (tests, notebooks, examples).

    ``BackgroundServer(async_engine, **build_app_options)`` starts at once on 127.0.0.1 and a free
    port; ``url`` is the base URL; ``stop()`` drains and stops the server (not the engine).
    """

    def __init__(
        self, async_engine: AsyncEngine, host: str = "127.0.0.1", port: int = 0, **app_options: Any
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="tokencake-http", daemon=True
        )
        self._thread.start()
        self.app = build_app(async_engine, **app_options)
        self.runner, self.port = self.run(start_site(self.app, host, port, shutdown_timeout=5.0))
        self.url = f"http://{host}:{self.port}"

    def run(self, coro: Awaitable[Any], timeout: float | None = 60.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    @property
    def state(self) -> Any:
        return self.app[_STATE_KEY]

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
