"""The typed refusal of one request, raised where the problem is found.

The engine, the scheduler core, the metadata parser, the lifecycle and the sampling parameters
raise :class:`RequestRejected` naming the offending input; the HTTP server maps it to a 4xx
answer in one place (``tokencake.server.errors``). Nothing downstream reads the message to
choose a status, so rewording a message never changes an HTTP answer.

Pure Python (no JAX): importable from ``scheduler/``.
"""

from __future__ import annotations


class RequestRejected(ValueError):
    """A request refused for bad input; nothing was queued or changed.

    ``param`` names the offending input as a dotted path in the engine's terms: ``prompt``,
    ``max_tokens``, ``request_id``, ``metadata`` / ``metadata.<field>``, a sampling field
    (``temperature``, ``top_p``, ...) or an event field (``lifecycle_id``, ``kind``, ...).
    The server translates the head of the path into the wire name the client used (``messages``
    for a chat, ``max_completion_tokens``, ``tokencake.<field>``). ``status`` is the HTTP-style
    class of the refusal: 400 (invalid), 404 (unknown), 409 (conflicts with live state).
    ``code`` is an optional machine-readable reason. A ``ValueError``, so callers that catch
    bad input generically keep working.
    """

    def __init__(
        self, param: str | None, message: str, status: int = 400, code: str | None = None
    ) -> None:
        if status not in (400, 404, 409):
            raise ValueError(f"RequestRejected status must be 400, 404 or 409, got {status}")
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status
        self.code = code

    def __reduce__(self):  # keep the fields when pickled (e.g. across processes)
        return (type(self), (self.param, self.message, self.status, self.code))
