"""What a preemption victim costs to bring back, in seconds (issue 12, sixth round).

A preempted request is swapped when every block is written back to the host tier: the prefix
the host holds comes back by a copy-in, the rest is recomputed. The Space Scheduler's native
victim key counts only the recompute (per freed block), which is zero for a long session
whose whole context is on the host, however long its copy-in; this module prices both with
the engine's cost model so the victim rule can compare them
(``scheduling.victim_by_restore_time``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokencake.memory.cost_model import CostModel
from tokencake.scheduler.request import Request


def restore_seconds(
    running: Sequence[Request],
    restorable_tokens: Mapping[str, int],
    cost: CostModel,
    block_size: int,
) -> dict[str, float]:
    """Request id -> predicted seconds to restore its computed KV after a preemption: the
    host-restorable prefix copied in (``h2d``), the remaining computed tokens recomputed after
    it."""
    out: dict[str, float] = {}
    for r in running:
        kept = min(restorable_tokens.get(r.request_id, 0), r.num_computed_tokens)
        out[r.request_id] = cost.copy_time(kept // block_size, "h2d") + cost.recompute_time(
            r.num_computed_tokens - kept, kept
        )
    return out
