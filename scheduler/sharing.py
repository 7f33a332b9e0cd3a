"""Prefix sharing between requests that are not yet resident together (issue 12).

A fan-out's siblings share their parent's context. When that context is not cached (it was
evicted during the parent's tool call, or the parent's own tokens are still being computed),
the first sibling admitted computes it; a second sibling admitted before those blocks exist
computes the very same prefix again, into its own blocks: twice the compute and twice the
memory for one context. vLLM does exactly that. Deferring the second sibling until the blocks
it needs have been computed (a step or a few later) turns its admission into a prefix hit.

:func:`inflight_hashes` lists the block hashes running requests are about to compute;
:func:`waits_for_inflight` says whether a waiting request's next uncached block is one of them.
:class:`Prefills` lists the same hashes without a pass over every running request: it keeps the
few running requests that may still be prefilling, from their admission on.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokencake.scheduler.request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING


def inflight_hashes(running: Sequence[Request], block_size: int) -> set[bytes]:
    """Hashes of the full blocks running requests are still prefilling (computed soon)."""
    out: set[bytes] = set()
    for r in running:
        # ``r.is_prefill``, inlined: this visits every running request every step.
        if r.num_computed_tokens >= len(r.prompt_token_ids) + len(r.output_token_ids) - 1:
            continue
        hashes = r.block_hashes(block_size)
        out.update(hashes[r.num_computed_tokens // block_size :])
    return out


class Prefills:
    """The running requests that may still be prefilling, kept from their admission on, so
    that :meth:`inflight` visits a few requests instead of the 256 running ones every step
    (issue 17 item 4); it returns exactly ``inflight_hashes(running, block_size)``.

    Why the kept set suffices: a request joins the running set only by an admission, which
    the scheduler core reports (:meth:`admitted`); once a running request has computed its
    prompt it never prefills again while it runs (the core appends a token only when a chunk
    reaches the end of the sequence, so ``num_computed_tokens`` stays ``num_tokens - 1``); it
    leaves the running set by a preemption or a finish (its status is then no longer
    ``RUNNING``) and comes back only through another admission. So every prefilling running
    request is in the set, and a request leaves the set the first time it is seen done or out.
    """

    def __init__(self) -> None:
        self._maybe: set[Request] = set()

    def admitted(self, r: Request) -> None:
        """``r`` joined the running set (its prefix hit, if any, applied)."""
        if r.is_prefill:
            self._maybe.add(r)

    def inflight(self, block_size: int) -> set[bytes]:
        """``inflight_hashes`` of the running set; drops the requests that are done or out."""
        out: set[bytes] = set()
        done = []
        for r in self._maybe:
            computed = r.num_computed_tokens
            if (
                r.status is not _RUNNING
                or computed >= len(r.prompt_token_ids) + len(r.output_token_ids) - 1
            ):
                done.append(r)  # never prefilling again before another admission
                continue
            out.update(r.block_hashes(block_size)[computed // block_size :])
        self._maybe.difference_update(done)
        return out


def waits_for_inflight(request: Request, inflight: set[bytes], block_size: int) -> bool:
    """True when the first block ``request`` would compute (after its prefix hit) is being
    computed by a running request: admitting it now would compute that block a second time."""
    if not inflight:
        return False
    i = len(request.block_ids)
    hashes = request.block_hashes(block_size)
    return i < len(hashes) and hashes[i] in inflight
