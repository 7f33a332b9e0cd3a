"""Prefix sharing between requests that are not yet resident together (issue 12).

A fan-out's siblings share their parent's context. When that context is not cached (it was
evicted during the parent's tool call, or the parent's own tokens are still being computed),
the first sibling admitted computes it; a second sibling admitted before those blocks exist
computes the very same prefix again, into its own blocks: twice the compute and twice the
memory for one context. vLLM does exactly that. Deferring the second sibling until the blocks
it needs have been computed (a step or a few later) turns its admission into a prefix hit.

:func:`inflight_hashes` lists the block hashes running requests are about to compute;
:func:`waits_for_inflight` says whether a waiting request's next uncached block is one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokencake.scheduler.request import Request


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


def waits_for_inflight(request: Request, inflight: set[bytes], block_size: int) -> bool:
    """True when the first block ``request`` would compute (after its prefix hit) is being
    computed by a running request: admitting it now would compute that block a second time."""
    if not inflight:
        return False
    i = len(request.block_ids)
    hashes = request.block_hashes(block_size)
    return i < len(hashes) and hashes[i] in inflight
