"""Stall-free prefill: how many prefill tokens a step with decode rows may carry.

A decode step on an accelerator is bound by reading the weights and the rows' KV; its compute
units idle for most of it. Prefill tokens that fit in that idle compute cost nothing, while a
whole prompt chunk (up to the token budget, 8,192 in vLLM's default) turns the step
compute-bound and stalls every decoding request for its length. Sarathi-Serve (Agrawal et al.,
OSDI 2024) bounds each step's prefill so decodes never stall; this caps it at the room the
cost model's roofline leaves (:meth:`CostModel.free_prefill_tokens`). A step without decode
rows takes the whole budget, as before: nothing waits on it.

The room is counted in tokens of the cost model's per-token compute ``b``. The core prices
each capped chunk with its attention over the context before it as well
(:meth:`CostModel.prefill_in_room`), so a chunk deep into a long prompt gets fewer tokens and
the step still ends at its floor.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokencake.memory.cost_model import CostModel
from tokencake.scheduler.request import Request


def stall_free_cap(cost: CostModel, running: Sequence[Request], block_size: int) -> int | None:
    """The step's prefill cap: the free room under its decode rows' floor, or None (no cap)
    when no row decodes or the room is under one block (compute-bound hardware, or an
    unmeasured floor: capping there would only slow prefill down)."""
    if cost.step_floor_s <= 0:
        return None
    if cost.step_floor_ctx_s <= 0 and cost.free_prefill_tokens(0, 0) < block_size:
        return None  # no room even for a step of no rows (the CPU engine): skip the pass
    rows = context = 0
    for r in running:
        computed = r.num_computed_tokens
        if len(r.prompt_token_ids) + len(r.output_token_ids) - computed <= 1:
            rows += 1
            context += computed + 1
    if not rows:
        return None
    room = cost.free_prefill_tokens(rows, context)
    return room if room >= block_size else None


def capped_chunk(
    cost: CostModel, room: int, block_size: int, room_left: int, context: int, n_max: int
) -> tuple[int, int]:
    """A capped prefill chunk of at most ``n_max`` tokens after ``context`` cached ones:
    ``(tokens, room used)`` with ``room_left`` of the step's ``room`` still free.

    The chunk is priced with its attention (:meth:`CostModel.prefill_in_room`), with one
    guarantee: the step's first capped chunk (the room untouched) gets at least a block, or
    ``n_max`` if smaller, and uses the whole room. That overruns the floor by at most a block;
    without it a context whose attention fills the room (a long prompt, or a noisy fit of the
    attention cost) would crawl a token a step, or stop, while decode rows keep running."""
    n, used = cost.prefill_in_room(room_left, context, n_max)
    least = min(n_max, block_size)
    if n < least and room_left == room:
        return least, room
    return n, used
