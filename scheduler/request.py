"""A request as the scheduler sees it: tokens, progress, blocks, status. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tokencake.memory.block_pool import chain_hash

#: Stands in ``output_token_ids`` for a token sampled by a step still running on the device
#: (overlap scheduling: the next step is planned before this one's tokens are read back).
PENDING_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or context limit
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    """One generation request. ``metadata`` carries optional agent hints (see metadata.py).

    Compared by identity: the queues look requests up with ``in`` / ``remove``, and field-wise
    equality both compared whole token lists on that hot path and could match a different
    request with the same contents."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    metadata: Any = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    # Tokens executed a second time: a chunk's part below ``max_computed_tokens`` (after a
    # preemption dropped KV the request had, by computation, prefix hit or copy-in).
    num_recomputed_tokens: int = 0
    max_computed_tokens: int = 0  # high-water mark of num_computed_tokens
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    reuse_ranked: bool = False  # its cached prefix was ranked for eviction while it queued
    # Trailing ``output_token_ids`` that are PENDING_TOKEN: sampled by the step in flight,
    # read back and filled in by ``Scheduler.resolve`` (0 or 1; always 0 without overlap).
    num_pending: int = 0
    _hashed_blocks: int = 0  # how many leading full blocks are registered in the prefix cache
    _block_hashes: list[bytes] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_prefill(self) -> bool:
        """True while tokens other than the last sampled one still need computing."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def remaining_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.max_tokens

    def block_hashes(self, block_size: int) -> list[bytes]:
        """Chained hashes of every full block of the tokens so far (one scheduler, one block
        size). Extended incrementally and shared by every caller: tokens only grow, so earlier
        hashes stay valid, and a decode step no longer rehashes the whole sequence. A block
        holding a pending token (still on the device) is not full yet."""
        hs = self._block_hashes
        full = (self.num_tokens - self.num_pending) // block_size
        if len(hs) < full:
            tokens = self.all_token_ids
            for i in range(len(hs), full):
                hs.append(
                    chain_hash(
                        hs[-1] if hs else None, tokens[i * block_size : (i + 1) * block_size]
                    )
                )
        return hs
