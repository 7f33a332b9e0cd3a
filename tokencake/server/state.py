"""Per-app state: settings, in-flight bookkeeping for draining, metrics; the app's keys."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tokencake.async_engine import AsyncEngine
from tokencake.responses_api import ResponseStore
from tokencake.server.metrics import Metrics

ENGINE_KEY = web.AppKey("engine", AsyncEngine)
STATE_KEY = web.AppKey("state", object)
REQUEST_ID_KEY = web.RequestKey("tc_request_id", str)
# How the request being served spells the engine's parameter names (GenerationRequest.wire_names).
WIRE_NAMES_KEY = web.RequestKey("tc_wire_names", dict)


class State:
    """Per-app mutable state: in-flight bookkeeping for draining, metrics, settings."""

    def __init__(
        self,
        engine: AsyncEngine,
        api_key: str | None,
        max_tokens_limit: int | None,
        drain_timeout_s: float,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        lenient: bool = False,
        response_store: ResponseStore | None = None,
    ) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.drain_timeout_s = drain_timeout_s
        self.metrics = Metrics()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        info = engine.info
        self.model_name = info.model_name
        self.max_model_len = info.max_model_len
        # The most tokens one sequence can ever hold in KV: bounds the default max_tokens too.
        self.max_seq_tokens = info.max_seq_tokens
        self.vocab_size = info.vocab_size
        # The model's own temperature / top_p / top_k, for requests that omit them.
        self.sampling_defaults = info.sampling_defaults
        self.created = int(time.time())
        self.lenient = lenient  # unknown request fields: refuse (False) or ignore (True)
        self.response_store = response_store or ResponseStore()  # previous_response_id

    def begin(self) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.set(self.in_flight)

    def end(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self.idle.set()


def state_of(request: web.Request) -> State:
    return request.app[STATE_KEY]  # type: ignore[return-value]
