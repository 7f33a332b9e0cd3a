"""Request faults: one request's data broke scheduling, a policy or postprocessing.

A :class:`RequestFault` names the request (or tool-call lifecycle) whose data caused an
exception. The scheduler aborts that request with the fault as its error, and every other
request keeps running (DESIGN.md rule 8). :func:`blame` turns any exception raised while
working on one request into that request's fault; code that works on many requests at once
wraps each request's share of the work in it, so the culprit is named where it is found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RequestFault(Exception):
    """Request ``request_id``'s own data made the engine fail while ``stage`` ran; the request
    is aborted with this error. ``status`` is what the HTTP layer answers (the request was
    accepted but its data is unusable: a client error, never a 5xx)."""

    status = 400

    def __init__(self, request_id: str, stage: str, cause: BaseException | None = None) -> None:
        self.request_id = request_id
        self.stage = stage
        self.cause = cause
        what = f"{type(cause).__name__}: {str(cause)[:200]}" if cause is not None else "bad data"
        self.message = (
            f"request {request_id[:128]!r} was aborted: its data made {stage} fail ({what})"
        )
        super().__init__(self.message)


class StepFailed(RuntimeError):
    """The device step (or a KV copy) failed; the requests of that step are aborted with it.
    Not the request's fault: the HTTP layer answers 500 without details."""

    status = 500


@contextmanager
def blame(request: Any, stage: str) -> Iterator[None]:
    """Attribute any exception raised in the block to ``request`` (a Request, or an id)."""
    try:
        yield
    except RequestFault:
        raise
    except Exception as exc:
        rid = request if isinstance(request, str) else request.request_id
        raise RequestFault(rid, stage, exc) from exc
