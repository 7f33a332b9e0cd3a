"""The scheduler core's side of the host KV tier (issue #4): host prefix hits copied back in,
swap preemption, write-back of finished requests, and the copy-out they all share.

Every copy goes through the scheduler's :class:`~tokencake.scheduler.copies.CopyTracker`
(one mechanism for the core and the policies); this class only decides *which* pages move and
remembers what the core must wait for:

* a request admitted on a host prefix hit computes nothing until its copy-in has landed
  (:meth:`HostTier.awaits_copy_in`), so it never attends pages still in flight;
* a swapped-out request's host blocks stay retained until it resumes or ends
  (:meth:`HostTier.release_swap`);
* a write-back copies a finished request's cached pages the host lacks (LRU there, not
  retained).

With no host pool every method is a no-op (nothing is found, nothing is copied).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.plan import BlockCopy
from tokencake.scheduler.request import Request

#: Called when a request's copy-in has landed: ``(request_id, computed_tokens_after)``.
Resume = Callable[[str, int], None]


class HostTier:
    """Host prefix hits, swap-outs and write-backs of one scheduler's requests."""

    def __init__(
        self, pool: BlockPool, host: HostBlockPool | None, copies: CopyTracker, resume: Resume
    ) -> None:
        """``resume`` is the core's: the request's host pages have landed on the device, so
        its computed tokens move past them."""
        self.pool = pool
        self.host = host
        self.copies = copies
        self._resume = resume
        self._awaiting: dict[str, str] = {}  # request id -> tag of the copy-in it waits for
        self._hits: dict[str, tuple[int, list[int]]] = {}  # id -> (first block, host ids)
        self._swapped: dict[str, list[bytes]] = {}  # request id -> host hashes retained for it
        self.num_swap_outs = 0
        self.num_swap_fallbacks = 0

    # ---- host prefix hits ----------------------------------------------------------------------
    def awaits_copy_in(self, request_id: str) -> bool:
        """Whether the request's prefix pages are still being copied in (it must not run)."""
        return request_id in self._awaiting

    @property
    def awaiting(self) -> Mapping[str, str]:
        """Ids of the requests whose copy-in is in flight (a read-only view for the core's
        running loop, which tests it only when it is not empty)."""
        return self._awaiting

    def forget(self, request_id: str) -> None:
        """The request gave its device blocks back: drop its pending hit and copy-in wait
        (a copy still in flight lands into pages its fence holds, then is ignored)."""
        self._awaiting.pop(request_id, None)
        self._hits.pop(request_id, None)

    def note_hit(self, req: Request, first: int, usable: int) -> None:
        """Note the host blocks that continue ``req``'s device prefix hit of ``first`` blocks
        (up to ``usable`` blocks); they are taken only by :meth:`take_hit`."""
        self._hits.pop(req.request_id, None)
        host = self.host
        if host is None or first >= usable:
            return
        # With the prefix cache off, the host tier only gives a request back its own swap.
        if not (self.pool.enable_prefix_cache or req.request_id in self._swapped):
            return
        blocks = host.lookup_prefix(req._block_hashes[first:usable])
        if blocks:
            self._hits[req.request_id] = (first, blocks)

    def take_hit(self, req: Request) -> tuple[int, list[int]] | None:
        """``req``'s noted host hit ``(first device block, host blocks)``, once; None if none."""
        hit = self._hits.pop(req.request_id, None)
        return None if hit is None or self.host is None else hit

    def copy_in(self, req: Request, first: int, host_blocks: Sequence[int]) -> None:
        """Allocate device blocks for ``host_blocks`` (the caller checked they are free),
        append them to ``req``'s blocks and issue the copy-in. ``req`` waits for it; once it
        lands its computed tokens cover them (after a failed copy it recomputes them)."""
        m = len(host_blocks)
        dev = self.pool.allocate(m)
        req.block_ids.extend(dev)
        landed = partial(self._copied_in, req.request_id, (first + m) * self.pool.block_size)
        copy = self.copies.issue("h2d", dev, host_blocks, f"h2d:{req.request_id}", self, landed)
        self._awaiting[req.request_id] = copy.tag

    def _copied_in(self, request_id: str, computed_after: int, copy: BlockCopy, ok: bool) -> None:
        # A request that gave its blocks back since (finished, preempted) was forgotten.
        if self._awaiting.get(request_id) == copy.tag:
            del self._awaiting[request_id]
            if ok:
                self._resume(request_id, computed_after)

    # ---- swap preemption -----------------------------------------------------------------------
    def swap_out(self, req: Request) -> int:
        """Copy ``req``'s full computed blocks to the host tier and retain them until it
        resumes (its resume finds them through the prefix lookup). Returns the tokens
        preserved; 0 (counted as a fallback) when the host cannot take its first block."""
        if self.host is None:
            return 0
        bs = self.pool.block_size
        full = min(req.num_computed_tokens // bs, len(req.block_ids))
        kept = self.offload_blocks(
            req.block_ids[:full], req.block_hashes(bs)[:full], req.request_id
        )
        if not kept:
            self.num_swap_fallbacks += 1
            return 0
        self._swapped.setdefault(req.request_id, []).extend(kept)
        self.num_swap_outs += 1
        return len(kept) * bs

    def release_swap(self, req: Request) -> None:
        """Give back the host blocks retained for ``req``'s swap (it resumed or ended)."""
        hashes = self._swapped.pop(req.request_id, None)
        if hashes and self.host is not None:
            self.host.release(hashes)

    def swap_outs_will_cover(self, short: int) -> bool:
        """True when pages held only by in-flight swap-outs cover ``short`` missing blocks, so
        the request short of them should wait a step rather than preempt yet another."""
        # Only the core's own swap-outs count: a policy's copy-out may keep its pages pinned.
        held = {
            b
            for c in self.copies.copies_from(self, "d2h")
            for b in c.device_blocks
            if self.pool.ref_count(b) == 1
        }
        return 0 < short <= len(held)

    # ---- copy-out ------------------------------------------------------------------------------
    def offload_blocks(
        self,
        device_blocks: Sequence[int],
        hashes: Sequence[bytes],
        owner: str = "",
        retain: bool = True,
    ) -> list[bytes]:
        """Copy the device blocks holding the chained ``hashes`` (a prefix, in order) to the
        host tier; blocks already there are not copied again. Stops at the first block the
        host cannot take (a gapped prefix is useless). Device blocks may be in use or cached;
        the copy holds them until it lands. Returns the hashes on (or headed to) the host;
        with ``retain`` they are retained and the caller must ``host_pool.release`` them."""
        host = self.host
        if host is None:
            return []
        kept: list[bytes] = []
        dev: list[int] = []
        dst: list[int] = []
        for b, h in zip(device_blocks, hashes, strict=False):
            if host.block_of(h) is None:
                got = host.try_allocate(1)
                if got is None:
                    break  # host tier full: keep the contiguous prefix that fits
                host.register(got[0], h, pending=True)
                dev.append(b)
                dst.append(got[0])
            # Retain as we go, so a later allocation cannot evict an earlier kept block.
            kept += host.retain([h]) if retain else [h]
        if dev:  # the copy holds the device pages until it has landed
            self.copies.issue("d2h", dev, dst, f"d2h:{owner}", self)
        return kept

    def write_back(self, req: Request) -> None:
        """Copy the full blocks of a just-finished request's computed tokens that are still
        cached on the device and that the host tier lacks (LRU there, not retained)."""
        if self.host is None:
            return
        bs = self.pool.block_size
        hashes = req.block_hashes(bs)[: req.num_computed_tokens // bs]
        q, h = self.pool.queries, self.pool.hits  # a write-back is not a cache lookup
        blocks = self.pool.lookup_prefix(hashes)
        self.pool.queries, self.pool.hits = q, h
        if blocks:
            self.offload_blocks(blocks, hashes[: len(blocks)], req.request_id, retain=False)
