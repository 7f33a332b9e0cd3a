"""Running the app: a TCP site, JSON logging, the ``tokencake serve`` main, BackgroundServer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from tokencake.async_engine import AsyncEngine
from tokencake.config import EngineConfig
from tokencake.server.app import build_app
from tokencake.server.connections import (
    AcceptErrorLimiter,
    ConnectionLimits,
    GuardedTCPSite,
    raise_fd_limit,
)
from tokencake.server.state import STATE_KEY

log = logging.getLogger("tokencake.server")


async def start_site(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 60.0,
    limits: ConnectionLimits | None = None,
) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner (``await runner.cleanup()`` drains and stops)
    and the bound port (useful with ``port=0``).

    Handlers are cancelled when their client disconnects: that is what aborts an abandoned
    generation and frees its blocks. ``limits`` (default :class:`ConnectionLimits`) sets the
    connection cap and the header and keep-alive timeouts (see ``connections.py``).
    """
    limits = limits or ConnectionLimits()
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout,
        keepalive_timeout=limits.keepalive_timeout_s,
    )  # fmt: skip
    await runner.setup()
    site = GuardedTCPSite(runner, host, port, limits)
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
    limits: ConnectionLimits | None = None,
    **app_options: Any,
) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then drain in-flight requests and stop."""
    from tokencake.engine import LLMEngine

    setup_json_logging()
    fds = raise_fd_limit()
    engine = AsyncEngine(LLMEngine(engine_config))

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorLimiter())
        app = build_app(engine, api_key, **app_options)
        runner, bound = await start_site(app, host, port, limits=limits)
        log.info(
            json.dumps(
                {
                    "event": "listening",
                    "host": host,
                    "port": bound,
                    "model": engine.engine.model_name,
                    "auth": bool(api_key),
                    "open_file_limit": fds,
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


class BackgroundServer:
    """Serve an app on a private event loop in a daemon thread (tests, notebooks, examples).

    ``BackgroundServer(async_engine, **build_app_options)`` starts at once on 127.0.0.1 and a free
    port; ``url`` is the base URL; ``stop()`` drains and stops the server (not the engine).
    """

    def __init__(
        self,
        async_engine: AsyncEngine,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ConnectionLimits | None = None,
        **app_options: Any,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="tokencake-http", daemon=True
        )
        self._thread.start()
        self.app = build_app(async_engine, **app_options)
        self.runner, self.port = self.run(
            start_site(self.app, host, port, shutdown_timeout=5.0, limits=limits)
        )
        self.url = f"http://{host}:{self.port}"

    def run(self, coro: Awaitable[Any], timeout: float | None = 60.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    @property
    def state(self) -> Any:
        return self.app[STATE_KEY]

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
