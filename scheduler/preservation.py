"""What the Time Scheduler holds for one tool call (``time_sched.py``): the state of its KV and
the pins, host copies and timers that go with it."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tokencake.scheduler.lifecycle import LifecycleRecord
from tokencake.scheduler.plan import BlockCopy


class PState(enum.Enum):
    KEPT = "kept"  # device blocks pinned
    OFFLOADING = "offloading"  # d2h in flight (sources pinned as a fence)
    OFFLOADED = "offloaded"  # on host, retained; waiting for the upload time
    UPLOADING = "uploading"  # h2d in flight
    RESTORED = "restored"  # back on device, pinned for the successor
    DROPPED = "dropped"  # nothing held


@dataclass
class Preservation:
    """One lifecycle's KV preservation (``seq``: creation order, the order ticks visit in).

    One is made for every finished annotated request and lives as long as its lifecycle, so it
    holds no container of its own until it needs one: ``hashes`` is the lifecycle's snapshot
    tuple itself, and ``pins`` and ``host_retained`` stay the empty tuple until something is
    pinned or retained (each is then replaced by a new sequence, never changed in place).
    Three lists per finished request were a fifth of the objects the garbage collector's
    young generation gained per step in the schedule benchmark (bench/RESULTS.md, issue 17
    item 4, "Tenth round")."""

    rec: LifecycleRecord
    hashes: tuple[bytes, ...]
    state: PState = PState.DROPPED
    pins: Sequence[int] = ()  # device blocks we hold one reference on
    host_retained: Sequence[bytes] = ()
    upload_at: float = math.inf
    n_restore: int = 0
    ttl: float = math.inf
    next_eval_step: int = 0
    last_sig: tuple | None = None
    inflight: BlockCopy | None = None  # the copy in flight for this call (at most one)
    decided: bool = False
    ttl_spent: bool = False  # a keep already ran out its TTL: never pin this call again
    ranked_for: float = math.nan  # predicted return its cached blocks were last ranked for
    seq: int = 0

    @property
    def dormant(self) -> bool:
        """Nothing held, nothing in flight, and its tool has not started (or its lifecycle has
        not ended): a tick has nothing to do for it until its lifecycle moves."""
        rec = self.rec
        return (
            self.state is PState.DROPPED
            and self.inflight is None
            and not rec.terminal
            and not rec.stalled
        )
