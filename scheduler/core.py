"""Continuous-batching scheduler core: waiting/running queues, token budget, chunked prefill,
prefix-cache hits and recompute preemption. Pure Python; the policy plugs in decisions.

Invariant kept by every method: a running request owns exactly the blocks covering its
``num_computed_tokens`` (plus those for the tokens scheduled this step), and every block it owns
is accounted for in the pool (``check_integrity``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tokencake.memory.block_pool import BlockPool, block_hashes
from tokencake.scheduler.plan import ScheduledChunk, StepPlan
from tokencake.scheduler.policy import Policy
from tokencake.scheduler.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits. ``max_num_batched_tokens`` bounds tokens per step (the prefill chunk
    budget); ``max_prefill_chunk`` bounds one request's chunk; ``max_model_len`` bounds a
    sequence (prompt + output)."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 512
    max_prefill_seqs: int = 4
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_prefill_chunk",
            "max_prefill_seqs",
            "max_model_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1")


class Scheduler:
    """Decides each step's batch. Call ``schedule()``, run the plan, then ``update()``."""

    def __init__(
        self,
        config: SchedulerConfig,
        pool: BlockPool,
        policy: Policy | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.config = config
        self.pool = pool
        self.policy = policy or Policy()
        self.clock = clock or time.monotonic
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens < 1:
            raise ValueError("prompt must contain at least one token")
        if request.max_total_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the model context limit of {self.config.max_model_len} tokens"
            )
        blocks_needed = math.ceil(request.max_total_tokens / self.pool.block_size)
        if blocks_needed > self.pool.capacity:
            raise ValueError(
                f"request needs up to {blocks_needed} KV blocks but the pool holds {self.pool.capacity}"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request wherever it is and free its blocks. Unknown ids return None."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def finish(self, req: Request, status: RequestStatus) -> None:
        if req.status.finished:
            return
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = status
        req.finish_time = self.clock()
        self.requests.pop(req.request_id, None)
        self.policy.on_finished(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- block accounting -------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.pool.block_size)

    def _release(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
        req.block_ids = []
        req._hashed_blocks = 0

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make ``req`` own blocks for ``num_tokens`` tokens; False if the pool is short."""
        need = self._blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute preemption: drop the KV (cached blocks stay revivable) and requeue."""
        self.running.remove(req)
        self._release(req)
        req.num_recomputed_tokens += req.num_computed_tokens
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)

    def _apply_prefix_hit(self, req: Request) -> None:
        """Adopt cached blocks for the longest cached prefix of ``req``'s tokens."""
        tokens = req.all_token_ids
        req._block_hashes = block_hashes(tokens, self.pool.block_size)
        # Leave at least one token to compute so the step produces logits for sampling.
        usable = (len(tokens) - 1) // self.pool.block_size
        hits = self.pool.lookup_prefix(req._block_hashes[:usable])
        self.pool.take_cached(hits)
        req.block_ids = list(hits)
        req._hashed_blocks = len(hits)
        req.num_computed_tokens = len(hits) * self.pool.block_size

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Choose this step's chunks (decode tokens first, then prefill chunks)."""
        now = self.clock()
        cfg = self.config
        self.policy.on_step(now, self.running, self.waiting, self.pool)
        plan = StepPlan()
        budget = cfg.max_num_batched_tokens
        prefill_rows = 0

        # 1. Running requests, oldest first; preempt per policy when blocks run out.
        for req in sorted(self.running, key=lambda r: r.arrival_time):
            if req not in self.running or budget <= 0:
                continue
            n = min(req.remaining_tokens, cfg.max_prefill_chunk, budget) if req.is_prefill else 1
            if n > 1 and prefill_rows >= cfg.max_prefill_seqs:
                continue
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.policy.choose_victim(self.running, req)
                if victim is None or victim is req:
                    self._preempt(req)
                    plan.preempted.append(req)
                    break
                self._preempt(victim)
                plan.preempted.append(victim)
                plan.chunks = [c for c in plan.chunks if c.request is not victim]
            if req.status is not RequestStatus.RUNNING:
                continue
            plan.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            prefill_rows += n > 1

        # 2. Admit waiting requests in policy order while budget, rows and blocks allow.
        if not plan.preempted:
            for req in self.policy.order_waiting(self.waiting, now):
                if (
                    budget <= 0
                    or len(self.running) >= cfg.max_num_seqs
                    or prefill_rows >= cfg.max_prefill_seqs
                ):
                    break
                self._apply_prefix_hit(req)
                n = min(req.remaining_tokens, cfg.max_prefill_chunk, budget)
                need = self._blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
                if need > self.pool.num_free or not self.policy.can_admit(
                    req, need, self.pool, self.running
                ):
                    self._release(req)
                    req.num_computed_tokens = 0
                    break  # strict order: do not let later requests jump the head
                if req.num_preemptions == 0 and req.first_scheduled_time is None:
                    req.num_cached_tokens = req.num_computed_tokens
                self._grow(req, req.num_computed_tokens + n)
                self.waiting.remove(req)
                self.running.append(req)
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                plan.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                budget -= n
                prefill_rows += n > 1
        return plan

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Request]:
        """Advance progress after the executor ran ``plan``; append sampled tokens.

        Returns requests that got a new token this step (the caller checks stop conditions
        and calls :meth:`finish`). Length limits are enforced here.
        """
        now = self.clock()
        produced = []
        for chunk in plan.chunks:
            req = chunk.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens = chunk.start + chunk.num_tokens
            self._register_full_blocks(req)
            if chunk.samples and req.request_id in sampled:
                req.output_token_ids.append(sampled[req.request_id])
                if req.first_token_time is None:
                    req.first_token_time = now
                produced.append(req)
                if len(req.output_token_ids) >= req.max_tokens:
                    self.finish(req, RequestStatus.FINISHED_LENGTH)
        return produced

    def _register_full_blocks(self, req: Request) -> None:
        full = req.num_computed_tokens // self.pool.block_size
        if full <= req._hashed_blocks:
            return
        tokens = req.all_token_ids
        if len(req._block_hashes) < full:
            req._block_hashes = block_hashes(
                tokens[: full * self.pool.block_size], self.pool.block_size
            )
        for i in range(req._hashed_blocks, full):
            self.pool.register(req.block_ids[i], req._block_hashes[i])
        req._hashed_blocks = full
