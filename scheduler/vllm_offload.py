"""``vllm-offload``: the vLLM V1 baseline plus a host KV tier, as vLLM's CPU offloading
connector and LMCache-style connectors give it.

Every full, hashed block a request computed is written back to the host tier (once: blocks
already there are not copied again) when the request finishes, and a preempted request's full
blocks are written back before its device blocks are released (swap). Later requests hit those
blocks in the host tier after their device prefix hit and read them back (the core's copy-in
admission), instead of recomputing what the device cache evicted meanwhile. The host tier is
LRU. No agent knowledge: no metadata is read, nothing is pinned or uploaded ahead of time.

It shows how much of Tokencake's win is merely having host memory.
"""

from __future__ import annotations

from typing import Any

from tokencake.scheduler.policy import VLLMPolicy
from tokencake.scheduler.request import Request


class VLLMOffloadPolicy(VLLMPolicy):
    """:class:`VLLMPolicy` with write-back of every computed block to the host tier."""

    name = "vllm-offload"

    def __init__(self) -> None:
        super().__init__()
        self.sched: Any = None

    def bind(self, scheduler: Any) -> None:
        self.sched = scheduler

    def preemption_mode(self, victim: Request) -> str:
        """Swap: a victim's full blocks go to the host tier before they are released."""
        return "swap"

    def on_finished(self, request: Request) -> None:
        super().on_finished(request)
        self.write_back(request)

    def write_back(self, request: Request) -> None:
        """See :func:`write_back`."""
        write_back(self.sched, request)


def write_back(sched: Any, request: Request) -> None:
    """Copy the full blocks of ``request``'s computed tokens that are still cached on the
    device (it has just released them) and that the host tier lacks (LRU there)."""
    if sched is None or sched.host_pool is None:
        return
    pool = sched.pool
    bs = pool.block_size
    hashes = request.block_hashes(bs)[: max(0, request.num_computed_tokens) // bs]
    q, h = pool.queries, pool.hits  # a write-back is not a cache lookup
    blocks = pool.lookup_prefix(hashes)
    pool.queries, pool.hits = q, h
    if blocks:
        sched.offload_blocks(blocks, hashes[: len(blocks)], request.request_id, retain=False)
