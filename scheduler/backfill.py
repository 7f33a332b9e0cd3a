"""Backfill admission behind a blocked queue head (issue 12; EASY backfilling, Lifka 1995).

Admission is strict: when the best-ranked waiting request does not fit, nothing behind it
starts, so the free and evictable blocks it cannot use yet sit idle until enough running
requests finish (measured: 12-20% of the pool on average on the code-writer workloads). A
request behind the head may start anyway when it cannot delay the head:

* the head's **shadow step**: running requests free their exclusively owned blocks when they
  finish, in at most ``steps_to_finish`` steps each (prefill chunks left plus ``max_tokens``
  minus tokens generated: an upper bound when the request may stop early); the shadow is
  the first step by which the freed blocks cover the head's shortfall, and ``extra`` is what
  is left over then;
* a candidate that fits now is admitted if it will itself finish by the shadow step, or if
  its blocks fit in ``extra`` (which it then uses up).

A request whose blocks the Time Scheduler may pin when it finishes (a KEEP for the tool call
that follows it: they stay held until its successor takes them or the TTL runs out; ``kept``)
may free nothing then, so the head may start *later* than the shadow step. That is harmless for
the first rule (a candidate done by an early shadow is done by the real one), not for the
second: with ``kept`` given, ``extra`` counts only blocks that will really be freed (the lesser
of the two leftovers, with and without those requests; 0 when the shadow without them never
covers the shortfall). Tokencake passes it only under ``scheduling.backfill_sure_extra``, off
by default: the optimistic ``extra`` finished sooner overall (``bench/RESULTS.md``).

Only the first blocked request gets this protection (EASY), and the scan behind it is bounded
(``window`` candidates). Nothing here changes which tokens are computed, only when.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.request import Request


def steps_to_finish(r: Request, chunk: int) -> int:
    """Engine steps before ``r`` finishes, at most: its prefill chunks left (the part of its
    current sequence not yet computed) plus its decode steps left (``max_tokens`` bound)."""
    todo = r.remaining_tokens if r.is_prefill else 0
    return -(-todo // chunk) + max(0, r.max_tokens - len(r.output_token_ids))


def shadow(
    shortfall: int,
    running: Sequence[Request],
    pool: BlockPool,
    chunk: int,
    kept: Callable[[Request], bool] | None = None,
) -> tuple[int, int] | None:
    """``(shadow step, extra blocks)`` for a head ``shortfall`` blocks short; None when the
    running requests' exclusive blocks never cover it (then nothing is backfilled). A request
    for which ``kept`` says True frees no blocks (they may stay pinned past its finish)."""
    if shortfall <= 0:
        return 0, -shortfall
    ends = sorted(
        (steps_to_finish(r, chunk), sum(1 for b in r.block_ids if pool.ref_count(b) == 1))
        for r in running
        if kept is None or not kept(r)
    )
    freed = 0
    for step, n in ends:
        freed += n
        if freed >= shortfall:
            return step, freed - shortfall
    return None


class Backfill:
    """One admission pass's backfill state: call :meth:`reset` at the start of each pass,
    :meth:`blocked` when a request does not fit, :meth:`allows` for a request that fits."""

    def __init__(
        self,
        pool: BlockPool,
        chunk: int,
        window: int = 32,
        kept: Callable[[Request], bool] | None = None,
    ) -> None:
        self.pool = pool
        self.chunk = chunk
        self.window = window
        self.kept = kept  # running requests whose blocks may stay pinned when they finish
        self.shadow_step: int | None = None
        self.extra = 0
        self.scanned = 0
        self.backfilled = 0  # requests admitted behind a blocked head (a counter)

    def reset(self) -> None:
        self.shadow_step = None
        self.extra = 0
        self.scanned = 0

    @property
    def active(self) -> bool:
        """A head is blocked this pass: later candidates are backfill candidates."""
        return self.shadow_step is not None

    def blocked(self, shortfall: int, running: Sequence[Request]) -> bool:
        """A candidate is ``shortfall`` blocks short. The first one becomes the protected head;
        returns True while the scan may go on behind it (False: stop, as without backfill)."""
        if self.shadow_step is None:
            s = shadow(shortfall, running, self.pool, self.chunk)
            if s is None:
                return False
            self.shadow_step, self.extra = s
            if self.kept is not None and any(self.kept(r) for r in running):
                sure = shadow(shortfall, running, self.pool, self.chunk, self.kept)
                # the fewer of the two: the blocks may or may not stay pinned
                self.extra = 0 if sure is None else min(self.extra, sure[1])
            return True
        self.scanned += 1
        return self.scanned < self.window

    def allows(self, r: Request, demand: int) -> bool:
        """May ``r`` (fits now, needs ``demand`` blocks) start without delaying the head?"""
        assert self.shadow_step is not None
        self.scanned += 1
        if steps_to_finish(r, self.chunk) <= self.shadow_step:
            ok = True
        elif demand <= self.extra:
            self.extra -= demand
            ok = True
        else:
            ok = False
        self.backfilled += ok
        return ok

    @property
    def exhausted(self) -> bool:
        return self.shadow_step is not None and self.scanned >= self.window
