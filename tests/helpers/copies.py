"""Hold KV copies of one direction back, so a test sees them truly in flight."""

from __future__ import annotations

from tokencake.memory.transfer import TransferEngine


class _Deferred:
    def __init__(self) -> None:
        self.ready = False

    def is_ready(self) -> bool:
        return self.ready


def defer_copies(te: TransferEngine, direction: str):
    """Hold ``direction`` copies back: nothing is read or written until ``release()``."""
    queued = []
    real = te._dispatch

    def dispatch(d, dev, host):
        if d != direction:
            return real(d, dev, host)
        marker = _Deferred()
        queued.append((marker, dev, host))
        return marker

    def release():
        for marker, dev, host in queued:
            real(direction, dev, host)
            marker.ready = True
        queued.clear()

    te._dispatch = dispatch
    return queued, release
