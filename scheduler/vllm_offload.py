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

from tokencake.scheduler.policy import VLLMPolicy
from tokencake.scheduler.request import Request


class VLLMOffloadPolicy(VLLMPolicy):
    """:class:`VLLMPolicy` with write-back of every computed block to the host tier."""

    name = "vllm-offload"

    def preemption_mode(self, victim: Request) -> str | None:
        """Swap: a victim's full blocks go to the host tier before they are released."""
        return "swap" if self.ctx.host_pool is not None else None

    def writes_back(self, request: Request) -> bool:
        return True
