"""Running the app: the listening socket (checked first), a site, the ``tokencake serve`` main,
and ``BackgroundServer``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from tokencake.async_engine import AsyncEngine
from tokencake.config import EngineConfig
from tokencake.gc_heap import freeze_startup_heap
from tokencake.logs import setup_json_logging
from tokencake.server.app import build_app
from tokencake.server.connections import (
    AcceptErrorLimiter,
    ConnectionLimits,
    GuardedSockSite,
    GuardedTCPSite,
    raise_fd_limit,
)
from tokencake.server.listen import listen_socket
from tokencake.server.state import STATE_KEY

log = logging.getLogger("tokencake.server")


async def start_site(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 60.0,
    sock: socket.socket | None = None,
    limits: ConnectionLimits | None = None,
) -> tuple[web.AppRunner, int]:
    """Start serving ``app`` on ``host:port`` (or an already listening ``sock``); returns the
    runner (``await runner.cleanup()`` drains and stops) and the bound port (useful with
    ``port=0``).

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
    site: web.BaseSite
    if sock is not None:
        site = GuardedSockSite(runner, sock, limits)
    else:
        site = GuardedTCPSite(runner, host, port, limits)
    await site.start()
    if sock is not None:
        return runner, sock.getsockname()[1]
    server = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port  # type: ignore[union-attr]
    return runner, bound


def run_server(
    engine_config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    log_format: str = "text",
    sock: socket.socket | None = None,
    limits: ConnectionLimits | None = None,
    **app_options: Any,
) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then drain in-flight requests and stop.

    The port is bound first, so a taken one fails at once (:class:`PortUnavailableError`)
    rather than after the warm-up. ``log_format="text"`` shows a warm-up progress bar and one
    line ``serving <model> on http://HOST:PORT``; ``"json"`` logs every event (requests
    included) as one JSON object a line instead. ``sock``: an already listening socket
    (:func:`listen_socket`) to serve on instead of binding ``host:port``. ``limits``: the
    connection limits (cap, header / body / keep-alive timeouts); accept errors are logged at
    most once per 10 s and the soft open-file limit is raised to the hard one.
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    json_logs = log_format == "json"
    if json_logs:
        setup_json_logging()
    raise_fd_limit()
    if sock is None:
        sock = listen_socket(host, port)
    try:
        engine = AsyncEngine(_load_engine(engine_config, progress=not json_logs))
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorLimiter())
        app = build_app(engine, api_key, **app_options)
        runner, _ = await start_site(app, sock=sock, limits=limits)
        # Handlers before the "serving" line: a Ctrl-C (or a supervisor's SIGINT) sent as soon as
        # the line appears must stop the server cleanly, not raise KeyboardInterrupt.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        name = engine.info.model_name
        if json_logs:
            log.info(json.dumps({"event": "listening", "host": host, "port": bound, "url": url,
                                 "model": name, "auth": bool(api_key)}))  # fmt: skip
        else:
            auth = " (API key required)" if api_key else ""
            print(f"serving {name} on {url}{auth}; Ctrl-C stops", flush=True)
        if engine_config.distributed:  # a run that lost a process cannot serve again: stop
            watch = loop.create_task(_stop_when_dead(engine, stop))
        await stop.wait()
        if engine_config.distributed:
            watch.cancel()
        log.info(json.dumps({"event": "shutdown"}))
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    if engine_config.distributed and engine.error is not None:
        raise engine.error  # LLMEngine.failure: a process of the run died (tokencake.multihost)


async def _stop_when_dead(engine: AsyncEngine, stop: asyncio.Event) -> None:
    while engine.alive:
        await asyncio.sleep(0.2)
    log.error(json.dumps({"event": "engine_stopped", "error": str(engine.error)}))
    stop.set()


def run_follower(engine_config: EngineConfig) -> int:
    """A process of a ``distributed`` run other than process 0: load and warm up the same
    engine, then replay the leader's device calls until it shuts down (tokencake.multihost).
    Serves nothing. Returns 0 when the leader stopped normally; if the leader is gone or the
    run failed, reports it and ends the process at once (``multihost.exit_now``)."""
    from tokencake import multihost

    engine = _load_engine(engine_config, progress=False)
    try:
        calls = engine.follow()
    except Exception as exc:  # the coordination service (process 0) is gone, or a call failed
        print(
            f"tokencake: error: following process 0 failed ({type(exc).__name__}: {exc}); "
            "the leader is gone or the run lost a process",
            file=sys.stderr,
        )
        multihost.exit_now(1)
    engine.close()
    log.info("process 0 shut down after %d device calls; this follower stops", calls)
    return 0


def _load_engine(config: EngineConfig, progress: bool) -> Any:
    """The engine, warmed up (with a progress bar when ``progress``), with the start-up heap
    frozen (:func:`~tokencake.gc_heap.freeze_startup_heap`)."""
    from tokencake.engine import LLMEngine

    if progress:
        print(f"loading {config.model or 'the default model'} ...", file=sys.stderr, flush=True)
    engine = LLMEngine(dataclasses.replace(config, warmup=False))
    if config.warmup:
        engine.warmup(progress=progress)
    # This process is the engine's: the start-up heap (JAX, the model, compiled steps) is kept
    # out of every later collection, whose full passes would otherwise stall steps (gc_heap.py).
    frozen = freeze_startup_heap()
    log.info(json.dumps({"event": "gc_heap_frozen", "objects": frozen}))
    return engine


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
