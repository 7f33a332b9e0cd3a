"""Errors of the public API, importable without JAX.

:class:`RequestRejected`: bad input, refused where it was found (defined in
``tokencake.scheduler.errors`` so the pure-Python scheduler can raise it; the server maps it to
HTTP in one place). :class:`EngineDeadError`: the engine thread has stopped.
"""

from __future__ import annotations

from tokencake.scheduler.errors import RequestRejected

__all__ = ["EngineDeadError", "RequestRejected"]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no more requests can be served."""
