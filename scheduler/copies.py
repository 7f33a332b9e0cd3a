"""The one block-copy tracker: every KV page copy between the device pool and the host tier
is issued, held in flight, fenced and completed here, for the scheduler core (swap
preemption, host prefix hits) and for every policy (the Time Scheduler's offload and upload).

Protocol of one copy:

* **issue**: the caller has chosen the pages (host pages of a copy-out allocated and
  registered *pending* under their hashes; device pages of a copy-in freshly allocated). The
  tracker takes its own reference on every device page (the **fence**: neither finishing nor
  preempting the owner can recycle a page under a copy) and, for a copy-in, on every host
  page; the copy goes into the next ``StepPlan``.
* **complete** (the executor reports ``done`` or ``failed``): the fence is dropped first, so
  the issuer's callback sees the pool exactly as its own references leave it; a copy-out's host
  pages are published (``complete_write``) or discarded; a copy-in's host references drop;
  then the issuer's ``on_done(copy, ok)`` runs (register uploaded pages, resume a request).
* **fences for the executor**: :meth:`CopyTracker.check_step` asserts that a step neither
  attends pages still being copied in nor writes pages still being copied out, whatever the
  executor's own ordering (the simulator has none; a deferred or failed copy breaks JAX's).

The executor (``memory/transfer.py``'s ``TransferEngine`` on the real engine, the simulated
executor otherwise) only moves bytes and reports completions; it tracks nothing.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.plan import BlockCopy

#: Called once when a copy has landed (``ok``) or failed, after the tracker's own bookkeeping.
OnDone = Callable[[BlockCopy, bool], None]


class FenceViolationError(RuntimeError):
    """A step or copy would touch device pages that an in-flight copy still owns."""


@dataclass(frozen=True)
class _InFlight:
    copy: BlockCopy
    issuer: object  # who issued it (the core, a policy's Time Scheduler)
    on_done: OnDone | None


class CopyTracker:
    """Issued, in-flight and completed block copies, with their fences."""

    def __init__(self, pool: BlockPool, host: HostBlockPool | None) -> None:
        self.pool = pool
        self.host = host
        self._ids = itertools.count()
        self._new: list[BlockCopy] = []  # issued since the last plan
        self._in_flight: dict[str, _InFlight] = {}  # tag -> record
        self.num_failed = 0

    # ---- issue ----------------------------------------------------------------------------
    def issue(
        self,
        direction: str,
        device_blocks: Sequence[int],
        host_blocks: Sequence[int],
        tag_prefix: str,
        issuer: object,
        on_done: OnDone | None = None,
    ) -> BlockCopy:
        """Start copying ``device_blocks[i] <-> host_blocks[i]``. A copy-out (``"d2h"``)
        reads device pages in use or cached into host pages the caller allocated and
        registered pending; a copy-in (``"h2d"``) writes published host pages into device
        pages the caller just allocated, and nothing may attend those before it lands. The
        device pages (and a copy-in's host pages) are held until completion."""
        if direction == "h2d":
            busy = set(device_blocks) & self.fenced_blocks().keys()
            if busy:
                raise FenceViolationError(f"copy-in targets pages still in flight: {sorted(busy)}")
            if self.host is None:
                raise RuntimeError("a copy-in needs the host tier")
            self.pool.fork(device_blocks)
            self.host.acquire(host_blocks)
        elif direction == "d2h":
            self.pool.hold(device_blocks)
        else:
            raise ValueError(f"unknown copy direction {direction!r}")
        tag = f"{tag_prefix}:{next(self._ids)}"
        copy = BlockCopy(direction, tuple(device_blocks), tuple(host_blocks), tag)
        self._in_flight[tag] = _InFlight(copy, issuer, on_done)
        self._new.append(copy)
        return copy

    def take_new(self) -> list[BlockCopy]:
        """Copies issued since the last call, in issue order (they go into the next plan)."""
        out, self._new = self._new, []
        return out

    # ---- in flight ------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Copies issued whose completion has not been reported yet."""
        return len(self._in_flight)

    def copies_from(self, issuer: object, direction: str) -> list[BlockCopy]:
        """In-flight copies in ``direction`` that ``issuer`` started."""
        return [r.copy for r in self._in_flight.values()
                if r.issuer is issuer and r.copy.direction == direction]  # fmt: skip

    def fenced_blocks(self, direction: str | None = None) -> Counter[int]:
        """Device pages under in-flight copies (counted: two copy-outs may read one page)."""
        out: Counter[int] = Counter()
        for r in self._in_flight.values():
            if direction is None or r.copy.direction == direction:
                out.update(r.copy.device_blocks)
        return out

    def check_step(
        self, attended: Sequence[Sequence[int]], written: Sequence[Sequence[int]]
    ) -> None:
        """Raise if a step would attend pages still being copied in, or write pages still
        being copied out (``attended`` / ``written``: block lists per row)."""
        pending_in, pending_out = self.fenced_blocks("h2d"), self.fenced_blocks("d2h")
        for blocks in attended:
            bad = set(blocks) & pending_in.keys()
            if bad:
                raise FenceViolationError(
                    f"step attends pages still being copied in: {sorted(bad)}"
                )
        for blocks in written:
            bad = set(blocks) & pending_out.keys()
            if bad:
                raise FenceViolationError(
                    f"step overwrites pages still being copied out: {sorted(bad)}"
                )

    # ---- completion -----------------------------------------------------------------------
    def complete(self, done: Sequence[BlockCopy], failed: Sequence[BlockCopy] = ()) -> None:
        """The executor finished (``done``) or gave up on (``failed``) these copies."""
        for copy, ok in [(c, True) for c in done] + [(c, False) for c in failed]:
            rec = self._in_flight.pop(copy.tag, None)
            if rec is None or self.host is None:
                raise ValueError(f"completion of unknown copy {copy.tag!r}")
            c = rec.copy
            self.pool.free(c.device_blocks)  # the fence
            if c.direction == "d2h":
                if ok:
                    self.host.complete_write(c.host_blocks)
                    self.host.free(c.host_blocks)
                else:
                    self.host.discard(c.host_blocks)
            else:
                self.host.free(c.host_blocks)
            self.num_failed += not ok
            if rec.on_done is not None:
                rec.on_done(c, ok)
