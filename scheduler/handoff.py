"""Successor hand-off: a finished agent's cached context goes to the agent that reads it next
(issue 12, sixth round).

When an agent's request finishes, its blocks become cached (free, evictable). The agent that
follows it in the application (the report after the synthesizer, a fan-out's siblings after
their parent) is submitted at that moment with a prompt that extends those blocks. Ranked by
score alone, it often waits behind an older application's request, which then takes the freed
blocks, evicts the successor's cached context, and the successor later copies it back from the
host or recomputes it (deep-research: reports waited 13-15 s for a first token, 0.13 s without
memory pressure; bench/RESULTS.md, "Fifth round").

:class:`HandOff` remembers, for ``grace_s`` after a request finishes, the chained hash of its
last computed full block (and that block's index). A waiting request whose block at that index
has that hash extends the finished request's context; while that block is still cached on the
device it is a *successor* and goes first in the admission order (within the annotated part of
the queue: the ordinary-request barrier stands). Its admission then costs only its new blocks,
because the context it revives is already free capacity. After the grace it ranks by score
again, so a successor that cannot fit never holds the queue for long. A leaf of a described
DAG (the report) is not promoted (:func:`_leaf`). The Time Scheduler's ``handoff_grace_s``
does the same for a tool call's pinned blocks; this covers the blocks of an agent that has
simply finished.

Off by default: it did not pay on total E2E (bench/RESULTS.md, "Sixth round");
``tokencake-with-successor-handoff`` switches it on.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokencake.memory.block_pool import BlockPool
from tokencake.scheduler.request import Request, RequestStatus


class HandOff:
    """Recently finished requests' context tails, and the waiting requests that extend them."""

    def __init__(self, pool: BlockPool, grace_s: float) -> None:
        if grace_s <= 0:
            raise ValueError(f"HandOff grace_s must be > 0, got {grace_s!r}")
        self.pool = pool
        self.grace_s = grace_s
        # last full block's hash -> (its index, the finish time)
        self._tails: dict[bytes, tuple[int, float]] = {}
        self.promoted = 0  # admissions-order promotions, for the counters

    def on_finished(self, request: Request, now: float) -> None:
        """Remember ``request``'s context tail if something may read it next: an aborted
        request, or a leaf of a described DAG (nothing follows it), hands nothing on."""
        if request.status is RequestStatus.FINISHED_ABORTED:
            return
        m = request.metadata
        if m is not None and m.application_max_depth > 0 and m.out_degree == 0:
            return
        bs = self.pool.block_size
        hashes = request.block_hashes(bs)
        n = min(len(hashes), request.num_computed_tokens // bs)
        if n > 0:
            self._tails[hashes[n - 1]] = (n - 1, now)

    def successors(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """The waiting requests (in ``waiting`` order) that extend a context finished less
        than ``grace_s`` ago whose tail block is still cached on the device."""
        tails = self._tails
        if not tails:
            return []
        horizon = now - self.grace_s
        for h in [h for h, (_, t) in tails.items() if t < horizon or not self._resident(h)]:
            del tails[h]
        if not tails:
            return []
        since = min(t for _, t in tails.values())
        by_index: dict[int, set[bytes]] = {}
        for h, (i, _) in tails.items():
            by_index.setdefault(i, set()).add(h)
        out = []
        for r in waiting:
            # A successor is submitted when (or after) its predecessor finishes; a request
            # that has run before (preempted) is resuming its own context, not taking one on.
            if r.arrival_time < since or r.num_preemptions or _leaf(r):
                continue
            hs = r.block_hashes(self.pool.block_size)
            if any(i < len(hs) and hs[i] in want for i, want in by_index.items()):
                out.append(r)
        return out

    def promote(
        self, order: list[Request], waiting: Sequence[Request], now: float
    ) -> list[Request]:
        """``order`` with the successors among its annotated head moved to the front (in
        ``order``'s relative order). Requests past the first one without metadata stay
        where they are: the ordinary-request barrier is not jumped."""
        succ = self.successors(waiting, now)
        if not succ:
            return order
        cut = next((i for i, r in enumerate(order) if r.metadata is None), len(order))
        chosen = set(map(id, succ))
        first = [r for r in order[:cut] if id(r) in chosen]
        if not first:
            return order
        self.promoted += len(first)
        # a successor behind the barrier stays where it is
        moved = set(map(id, first))
        rest = [r for r in order if id(r) not in moved]
        return first + rest

    def _resident(self, h: bytes) -> bool:
        """Whether the block with hash ``h`` is still on the device (in use or cached)."""
        return bool(self.pool.lookup_prefix([h]))


def _leaf(r: Request) -> bool:
    """A leaf of a described DAG (nothing follows it): it is not promoted. Jumping the queue
    pays for a request that unblocks more of its application's work; a leaf only finishes
    its own, and with memory for about three large contexts at once the older requests it
    would pass carry the longer remaining chains (longest remaining work first). Promoting
    deep-research's reports too made its synthesizers wait 50 s instead of 33 s and the
    total 1.9% longer at both rates (bench/RESULTS.md, "Sixth round")."""
    m = r.metadata
    return m is not None and m.application_max_depth > 0 and m.out_degree == 0
