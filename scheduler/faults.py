"""Request faults: one request's data broke scheduling, a policy or postprocessing.

A :class:`RequestFault` names the request (or tool-call lifecycle) whose data caused an
exception. The scheduler aborts that request with the fault as its error, and every other
request keeps running (DESIGN.md rule 8). :func:`blame` turns any exception raised while
working on one request into that request's fault; code that works on many requests at once
wraps each request's share of the work in it, so the culprit is named where it is found.

``Scheduler.schedule`` finds the culprit of a failed step in three ways, cheapest first:

1. *Named where found.* Per-request work (scores, admission hooks, the Time Scheduler's
   per-lifecycle tick) runs under :func:`blame`.
2. *Probed.* An exception from a batch-wide phase that names no request (a sum over agent
   types, a sort) is traced by :func:`find_culprits`: every live request (and lifecycle) is
   checked alone, its metadata against the documented ranges, then the policy's uncached
   per-request math; the ones that fail are the culprits. One request at a time is exact and
   needs no replay of the failed phase, whose side effects (history, copies) must not run
   twice.
3. *The admission candidate.* Failing both, an exception raised while a waiting request was
   being admitted is that request's (the hooks run on its data alone).

The culprits are aborted and the step is planned again; an exception no request explains is
the engine's own and propagates (the caller fails the requests in flight). :class:`FaultLog`
keeps the aborted requests' faults until the engine reports them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokencake.scheduler.lifecycle import Lifecycle
    from tokencake.scheduler.request import Request

log = logging.getLogger(__name__)


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


def find_culprits(
    requests: Iterable[Request],
    lifecycle: Lifecycle,
    check_request: Callable[[Request, float], None],
    now: float,
) -> list[RequestFault]:
    """The requests (and lifecycles) whose data a batch-wide phase choked on: each request's
    metadata is validated and ``check_request`` (the policy's) recomputes, uncached, what the
    policy derives from it; then every other live lifecycle record is checked. Each check
    runs on one request alone, so a failure names exactly that request."""
    found: list[RequestFault] = []
    for req in list(requests):
        try:
            with blame(req, "validation"):
                if req.metadata is not None:
                    req.metadata.validate()
                check_request(req, now)
        except RequestFault as fault:
            found.append(fault)
    seen = {f.request_id for f in found}
    for rec in lifecycle.live():
        if rec.lifecycle_id in seen:
            continue
        try:
            with blame(rec.lifecycle_id, "validation"):
                lifecycle.check_record(rec)
        except RequestFault as fault:
            found.append(fault)
    return found


class FaultLog:
    """Faults logged and counted, and the aborted requests' faults kept for the engine to
    report (bounded: a driver that never drains them, like a bare simulator loop, must not
    grow without limit)."""

    def __init__(self, maxlen: int = 4096) -> None:
        self._pending: deque[tuple[Request | None, RequestFault]] = deque(maxlen=maxlen)
        self.count = 0  # every fault logged, reported or not

    def log(self, fault: RequestFault) -> None:
        """Count and log ``fault`` (with its cause's traceback)."""
        self.count += 1
        log.warning("%s", fault.message, exc_info=fault.cause)

    def report(self, request: Request | None, fault: RequestFault) -> None:
        """Keep ``fault`` for the engine: ``request`` was aborted by it (None: only a
        lifecycle ended)."""
        self._pending.append((request, fault))

    def pop(self) -> list[tuple[Request | None, RequestFault]]:
        """Faults reported since the last call (the engine turns them into error outputs)."""
        out = list(self._pending)
        self._pending.clear()
        return out
