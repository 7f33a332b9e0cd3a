"""The server's listening socket, bound before the model loads (no JAX import here): a taken
port fails in a second with a hint, not after minutes of warm-up with a traceback."""

from __future__ import annotations

import errno
import socket


class PortUnavailableError(RuntimeError):
    """The server cannot listen on the requested host and port."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound now: the server checks its port before
    loading and compiling the model, and nothing can take the port in between."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise PortUnavailableError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        # As asyncio does: a restart may reuse a port whose old connections sit in TIME_WAIT
        # (a live listener still refuses the bind).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = (
            "another server is listening there; choose another port with --port"
            if exc.errno == errno.EADDRINUSE
            else "choose another host or port with --host / --port"
        )
        raise PortUnavailableError(f"cannot listen on {host}:{port}: {reason} ({hint})") from None
    return sock
