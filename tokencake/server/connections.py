"""Connection hygiene: timeouts, a connection cap with a fast 503, quiet accept errors.

Without these a client can hold the server's sockets for free: slowloris connections that
never finish their headers, thousands of idle keep-alive connections, and at the
file-descriptor limit asyncio logs "accept() out of system resource" thousands of times a
second while ``/health`` stops answering (issue 15, finding 4).

* ``header_timeout_s``: a new connection must deliver its first request's complete headers
  within this time, or it is closed.
* ``keepalive_timeout_s``: an idle connection (no request in progress; also one trickling the
  next request's headers) is closed after this long; aiohttp's own keep-alive timer, which
  also covers a connection that never sends a byte.
* ``body_timeout_s``: reading a request body may take at most this long (408 past it;
  enforced where the body is read, see ``body.py``).
* ``max_connections``: one connection more is answered ``503`` at once and closed (the
  answer costs one small write, not a handler).

The guard wraps aiohttp's protocol factory by delegation (public asyncio protocol methods
only), so aiohttp's request handling is untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("tokencake.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-server connection limits (``tokencake serve --help`` lists them)."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < 86400:
                raise ValueError(f"{name} must be in (0, 86400) seconds, got {v!r}")


_BUSY_BODY = json.dumps({"error": {
    "message": "too many open connections; retry later", "type": "service_unavailable",
    "param": None, "code": "too_many_connections",
}}).encode()  # fmt: skip
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)
) + _BUSY_BODY


class ConnectionGuard:
    """Protocol factory around aiohttp's: counts connections, enforces the cap and the
    first-request header timeout. ``open`` / ``rejected`` / ``timed_out`` are counters."""

    def __init__(self, inner: Any, limits: ConnectionLimits) -> None:
        self.inner = inner
        self.limits = limits
        self.open = 0
        self.rejected = 0
        self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        return _GuardedProtocol(self)


class _GuardedProtocol(asyncio.Protocol):
    """Delegates every protocol call to aiohttp's handler once the connection is admitted."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: Any = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # last bytes seen while waiting for the end of the first headers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self.guard
        self.transport = transport  # type: ignore[assignment]
        if g.open >= g.limits.max_connections:
            g.rejected += 1
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        g.open += 1
        self.inner = g.inner()
        self.inner.connection_made(transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(g.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.guard.timed_out += 1
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            # Watch for the blank line that ends the first request's headers.
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = seen[-3:]
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.inner is not None:
            self.guard.open -= 1
            inner, self.inner = self.inner, None
            inner.connection_lost(exc)


class _GuardedSite(ABC):
    """The part both guarded sites share: ``start`` listens through a
    :class:`ConnectionGuard`; each site says where it listens (``_listen_kwargs``)."""

    limits: ConnectionLimits
    guard: ConnectionGuard | None

    @abstractmethod
    def _listen_kwargs(self) -> dict[str, Any]:
        """Where ``create_server`` listens (host and port, or an open socket)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # type: ignore[arg-type]
        server = self._runner.server  # type: ignore[attr-defined]
        assert server is not None
        self.guard = ConnectionGuard(server, self.limits)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard,
            backlog=self._backlog,
            **self._listen_kwargs(),  # type: ignore[attr-defined]
        )


class GuardedTCPSite(_GuardedSite, web.TCPSite):
    """``web.TCPSite`` whose connections pass through a :class:`ConnectionGuard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits):
        super().__init__(runner, host, port)
        self.limits = limits
        self.guard = None

    def _listen_kwargs(self) -> dict[str, Any]:
        return {"host": self._host, "port": self._port, "reuse_address": self._reuse_address,
                "reuse_port": self._reuse_port}  # fmt: skip


class GuardedSockSite(_GuardedSite, web.SockSite):
    """``web.SockSite`` (an already listening socket) with a :class:`ConnectionGuard`."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, limits: ConnectionLimits):
        super().__init__(runner, sock)
        self.limits = limits
        self.guard = None

    def _listen_kwargs(self) -> dict[str, Any]:
        return {"sock": self._sock}


class AcceptErrorLimiter:
    """Event-loop exception handler that logs each kind of accept error at most once per
    ``interval_s`` (with the number suppressed), and everything else as asyncio would."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        msg = str(context.get("message", ""))
        if "accept" not in msg:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last.get(msg, -1e18) < self.interval_s:
            self.suppressed[msg] = self.suppressed.get(msg, 0) + 1
            return
        self._last[msg] = now
        n = self.suppressed.pop(msg, 0)
        exc = context.get("exception")
        log.error(json.dumps({"event": "accept_error", "message": msg, "error": repr(exc),
                              "suppressed_since_last": n}))  # fmt: skip


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (idle sockets are cheap; running out of
    descriptors is not). Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
