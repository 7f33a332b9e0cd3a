"""Record XLA compilations while a block runs (the "no compile after warm-up" checks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import jax


@contextmanager
def recorded_compiles() -> Iterator[list[str]]:
    """Yield a list that collects one event name per backend compilation inside the block."""
    compiles: list[str] = []

    def listener(event: str, duration: float, **_: object) -> None:
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
