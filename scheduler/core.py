"""Continuous-batching scheduler core: waiting/running queues, token budget, chunked prefill,
prefix-cache hits and recompute preemption. Pure Python; the policy plugs in decisions.

Invariant kept by every method: a running request owns exactly the blocks covering its
``num_computed_tokens`` (plus those for the tokens scheduled this step), and every block it owns
is accounted for in the pool (``check_integrity``).

``SchedulerConfig`` (the batch limits) lives in ``config.py`` and is re-exported here.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.config import SchedulerConfig
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.faults import RequestFault, blame
from tokencake.scheduler.inferred import LifecycleTicket, ToolCallIndex
from tokencake.scheduler.lifecycle import Disposition, Lifecycle
from tokencake.scheduler.metadata import coerce_metadata
from tokencake.scheduler.plan import BlockCopy, ScheduledChunk, StepPlan
from tokencake.scheduler.policies import policy_factory
from tokencake.scheduler.policy import Admission, PolicyContext, PolicyFactory
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.scheduler.tokencake_config import TokencakeConfig

log = logging.getLogger(__name__)
MAX_FAULT_RETRIES = 16  # culprits removed per schedule() before a failure counts as the engine's


class Scheduler:
    """Decides each step's batch. Call ``schedule()``, run the plan, then ``update()``."""

    def __init__(
        self,
        config: SchedulerConfig,
        pool: BlockPool,
        policy: str | PolicyFactory = "vllm",
        clock: Callable[[], float] | None = None,
        host_pool: HostBlockPool | None = None,
        *,
        cost_model: CostModel | None = None,
        tokencake: TokencakeConfig | None = None,
    ) -> None:
        """``policy``: a registered name or a factory taking the :class:`PolicyContext`;
        ``cost_model`` prices copies and recompute for the policies (default: the paper's
        constants); ``tokencake`` configures the agent-aware policies and the lifecycles."""
        import time

        self.config = config
        self.pool = pool
        self.host_pool = host_pool
        self.copies = CopyTracker(pool, host_pool)  # every block copy, the policies' too
        self._awaiting: dict[str, str] = {}  # request id -> tag of the copy-in it waits for
        self._host_hit: dict[str, tuple[int, list[int]]] = {}  # id -> (first block, host ids)
        self._swapped: dict[str, list[bytes]] = {}  # request id -> host hashes retained for it
        self.num_swap_outs = 0
        self.num_swap_fallbacks = 0
        self._refused: tuple[str, Admission] | None = None  # latest refusal this admission pass
        self.clock = clock or time.monotonic
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Requests aborted by a fault, for the engine to report (bounded: a driver that never
        # drains them, like a bare simulator loop, must not grow without limit).
        self.faults: deque[tuple[Request | None, RequestFault]] = deque(maxlen=4096)
        self.num_faults = 0
        self._admitting: Request | None = None  # the admission candidate being worked on
        tokencake = tokencake or TokencakeConfig()
        # Tool-call lifecycles live here for every policy (the baseline only tracks them).
        self.lifecycle = Lifecycle(self.clock, tokencake.offload)
        # Lifecycles inferred from the tool-calling protocol feed the same records (rule 10).
        self.tool_calls = ToolCallIndex(self.lifecycle)
        self.cost_model = cost_model or CostModel.paper_default()
        factory = policy_factory(policy) if isinstance(policy, str) else policy
        self.policy = factory(
            PolicyContext(
                config,
                pool,
                host_pool,
                self.cost_model,
                self.clock,
                self.lifecycle,
                self.copies,
                tokencake,
            )  # fmt: skip
        )

    # ---- queue management -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise RequestRejected(
                "request_id",
                f"duplicate request id {request.request_id!r}",
                409,
                "duplicate_request_id",
            )
        if request.num_prompt_tokens < 1:
            raise RequestRejected("prompt", "prompt must contain at least one token")
        if request.max_total_tokens > self.config.max_model_len:
            raise RequestRejected(
                "max_tokens",
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the model context limit of {self.config.max_model_len} tokens",
            )
        blocks_needed = math.ceil(request.max_total_tokens / self.pool.block_size)
        if blocks_needed > self.pool.capacity:
            raise RequestRejected(
                "max_tokens",
                f"request needs up to {blocks_needed} KV blocks but the pool holds {self.pool.capacity}",
            )
        self._associate(request)
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
        """End ``req`` and free its blocks. The core's cleanup always completes: a policy or
        lifecycle hook that raises on this request's data is logged as a fault (the request
        has ended anyway) and never leaves blocks or queue entries behind."""
        if req.status.finished:
            return
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        try:
            with blame(req, "the finish hooks"):
                self._on_generation_finished(req, status)
        except RequestFault as fault:
            self._log_fault(fault)
            self.lifecycle.generation_finished(req.request_id, ok=False)
        self._release(req)
        self._release_swap(req)
        if status is not RequestStatus.FINISHED_ABORTED and self.policy.writes_back(req):
            self._write_back(req)
        req.status = status
        req.finish_time = self.clock()
        self.requests.pop(req.request_id, None)
        try:
            with blame(req, "the policy's finish hook"):
                self.policy.on_finished(req)
        except RequestFault as fault:
            self._log_fault(fault)

    # ---- fault isolation (DESIGN.md rule 8) --------------------------------------------------
    def fail(self, fault: RequestFault) -> None:
        """Abort the request ``fault`` names (its blocks are freed, its lifecycle ends) and
        record the fault for the engine to report; every other request keeps running. A fault
        naming a lifecycle whose request has already finished ends that lifecycle."""
        self._log_fault(fault)
        req = self.requests.get(fault.request_id)
        if req is None:
            self.lifecycle.fail(fault.request_id)
            self.faults.append((None, fault))
            return
        if req.status is RequestStatus.WAITING and req.block_ids:
            self._release(req)  # a half-done admission: restore "waiting owns no blocks"
            req.num_computed_tokens = 0
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        self.faults.append((req, fault))

    def pop_faults(self) -> list[tuple[Request | None, RequestFault]]:
        """Faults recorded since the last call (the engine turns them into error outputs)."""
        out = list(self.faults)
        self.faults.clear()
        return out

    def _log_fault(self, fault: RequestFault) -> None:
        self.num_faults += 1
        log.warning("%s", fault.message, exc_info=fault.cause)

    def _probe(self) -> list[RequestFault]:
        """Find the requests (and lifecycles) whose data a batch-wide phase choked on: check
        each one's inputs again and recompute, uncached, what the policy derives from them.
        Each check runs on one request alone, so a failure names exactly that request."""
        now = self.clock()
        found: list[RequestFault] = []
        for req in list(self.requests.values()):
            try:
                with blame(req, "validation"):
                    if req.metadata is not None:
                        req.metadata.validate()
                    self.policy.check_request(req, now)
            except RequestFault as fault:
                found.append(fault)
        seen = {f.request_id for f in found}
        for rec in self.lifecycle.live():
            if rec.lifecycle_id in seen:
                continue
            try:
                with blame(rec.lifecycle_id, "validation"):
                    self.lifecycle.check_record(rec)
            except RequestFault as fault:
                found.append(fault)
        return found

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_timer(self) -> float:
        """Clock time at which an idle scheduler should run ``schedule()`` anyway: the
        policy's timed work (Time Scheduler uploads, TTLs) and lifecycle deadlines."""
        return min(self.policy.next_due(), self.lifecycle.next_deadline)

    @property
    def copies_in_flight(self) -> int:
        """Copies issued to the executor whose completion has not been reported yet."""
        return self.copies.in_flight

    @property
    def num_failed_copies(self) -> int:
        """Copies the executor reported failed (their tokens are recomputed instead)."""
        return self.copies.num_failed

    # ---- block accounting -------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.pool.block_size)

    def _release(self, req: Request) -> None:
        self._awaiting.pop(req.request_id, None)
        self._host_hit.pop(req.request_id, None)
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
        """Recompute preemption: drop the KV (cached blocks stay revivable) and requeue. In
        swap mode the full blocks are first copied to the host tier (see ``_swap_out``)."""
        self.running.remove(req)
        self._swap_out(req)  # (tokens kept on the host are not recomputed; ``update`` counts)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        with blame(req, "the policy's preemption hook"):
            self.policy.on_preempted(req)

    def _apply_prefix_hit(self, req: Request) -> None:
        """Adopt cached blocks for the longest cached prefix of ``req``'s tokens."""
        hashes = req.block_hashes(self.pool.block_size)
        # Leave at least one token to compute so the step produces logits for sampling.
        usable = (req.num_tokens - 1) // self.pool.block_size
        hits = self.pool.lookup_prefix(hashes[:usable])
        self.pool.take_cached(hits)
        req.block_ids = list(hits)
        req._hashed_blocks = len(hits)
        req.num_computed_tokens = len(hits) * self.pool.block_size
        self._lookup_host_hit(req, len(hits), usable)

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Choose this step's chunks (decode tokens first, then prefill chunks).

        Fault isolation: an exception caused by one request's data aborts that request and
        the step is planned again without it; other requests never see it. The culprit is
        found in three ways, cheapest first:

        1. *Named where found.* Per-request work (scores, admission hooks, the Time
           Scheduler's per-lifecycle tick) runs under :func:`blame`, which turns any exception
           into a :class:`RequestFault` naming that request.
        2. *Probed.* An exception from a batch-wide phase that names no request (a sum over
           types, a sort) is traced by checking every live request alone (:meth:`_probe`:
           its metadata against the documented ranges, then the policy's uncached per-request
           math); the requests that fail are the culprits. Probing one request at a time is
           exact and needs no replay of the failed phase, whose side effects (history,
           copies) must not run twice.
        3. *The admission candidate.* Failing both, an exception raised while a waiting
           request was being admitted is that request's (the hooks run on its data alone).

        Between attempts the core's invariants hold because every mutation before a failure
        leaves a consistent state (an admitted request owns its blocks; a preempted one is
        requeued) and a half-admitted candidate's prefix-hit blocks are released. An
        exception no request explains is the engine's own fault and propagates: the caller
        fails the requests in flight.
        """
        for _ in range(MAX_FAULT_RETRIES):
            try:
                return self._schedule()
            except RequestFault as fault:
                self._rollback_admission()
                self.fail(fault)
            except Exception as exc:
                candidate = self._rollback_admission()
                culprits = self._probe()
                if not culprits and candidate is not None:
                    culprits = [RequestFault(candidate.request_id, "admission", exc)]
                if not culprits:
                    raise
                for fault in culprits:
                    self.fail(fault)
        return self._schedule()

    def _rollback_admission(self) -> Request | None:
        """After a failed ``_schedule``: the candidate that was being admitted gives back the
        prefix-hit blocks it took (a waiting request owns no blocks between steps)."""
        req, self._admitting = self._admitting, None
        if req is not None and req.status is RequestStatus.WAITING and req.block_ids:
            self._release(req)
            req.num_computed_tokens = 0
        return req

    def _schedule(self) -> StepPlan:
        now = self.clock()
        cfg = self.config
        self.lifecycle.expire()
        self.policy.on_step(now, self.running, self.waiting)
        plan = StepPlan()
        budget = cfg.max_num_batched_tokens
        prefill_rows = 0

        # 1. Running requests, oldest first; preempt per policy when blocks run out.
        for req in sorted(self.running, key=lambda r: r.arrival_time):
            if (
                req.status is not RequestStatus.RUNNING  # preempted as a victim this step
                or budget <= 0
                or req.request_id in self._awaiting
            ):
                continue  # (awaiting: its prefix pages are still being copied in)
            n = min(req.remaining_tokens, cfg.max_prefill_chunk, budget) if req.is_prefill else 1
            if n > 1 and prefill_rows >= cfg.max_prefill_seqs:
                continue
            grown = True
            while not self._grow(req, req.num_computed_tokens + n):
                if self._swap_out_will_cover(req, n):
                    grown = False  # victims' pages free up once their copy-out lands
                    break
                victim = self.policy.choose_victim(self.running, req)
                if victim is None or victim is req:
                    self._preempt(req)
                    plan.preempted.append(req)
                    break
                self._preempt(victim)
                plan.preempted.append(victim)
                plan.chunks = [c for c in plan.chunks if c.request is not victim]
            if not grown or req.status is not RequestStatus.RUNNING:
                continue
            plan.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            prefill_rows += n > 1

        # 2. Admit waiting requests in policy order while budget, rows and blocks allow.
        if not plan.preempted:
            # Capacity promised to restores in progress (§10): never handed to new admissions.
            committed = self.policy.committed_blocks(now)
            for pass_index in itertools.count():
                candidates = self.policy.admission_order(pass_index, self.waiting, now)
                if candidates is None:
                    break
                self._refused = None
                for req in candidates:
                    if req.status is not RequestStatus.WAITING:
                        continue
                    self._admitting = req
                    if (
                        budget <= 0
                        or len(self.running) >= cfg.max_num_seqs
                        or prefill_rows >= cfg.max_prefill_seqs
                    ):
                        break
                    self._apply_prefix_hit(req)
                    if self._admit_with_copy_in(req, now):
                        self.policy.on_admitted(req, now)
                        continue  # admitted; its first chunk runs once the host pages have landed
                    n = min(req.remaining_tokens, cfg.max_prefill_chunk, budget)
                    need = self._blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
                    fits = need <= self.pool.num_free - committed
                    if not fits:  # the policy says whether the scan stops here (strict order)
                        self._refused = (
                            req.request_id,
                            self.policy.on_blocked(req, need, self.running),
                        )
                    if not fits or not self._policy_admits(req, need):
                        self._release(req)
                        req.num_computed_tokens = 0
                        if self._refused == (req.request_id, Admission.DEFER):
                            continue  # the policy defers only this one (e.g. its reservation)
                        break  # strict order: do not let later requests jump the head
                    if req.num_preemptions == 0 and req.first_scheduled_time is None:
                        req.num_cached_tokens = req.num_computed_tokens
                    self._grow(req, req.num_computed_tokens + n)
                    self.waiting.remove(req)
                    self.running.append(req)
                    req.status = RequestStatus.RUNNING
                    self._release_swap(req)
                    if req.first_scheduled_time is None:
                        req.first_scheduled_time = now
                    self.policy.on_admitted(req, now)
                    plan.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                    budget -= n
                    prefill_rows += n > 1
        self._admitting = None
        if not self.running and self.waiting and not plan.preempted:
            # Nothing runs and nothing could start: let the policy give back held capacity
            # (pins, restore reservations) so the next step can admit the head.
            self.policy.on_admission_stalled()
        plan.copies.extend(self.copies.take_new())
        return plan

    def _policy_admits(self, req: Request, blocks_needed: int) -> bool:
        """Ask the policy; remember its latest refusal this pass: a request refused with
        DEFER (now or by the copy-in attempt just before) does not stop the pass."""
        verdict = self.policy.admit(req, blocks_needed, self.running)
        if verdict is Admission.ADMIT:
            return True
        self._refused = (req.request_id, verdict)
        return False

    def update(self, plan: StepPlan, sampled: Mapping[str, int]) -> list[Request]:
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
            end = chunk.start + chunk.num_tokens
            # Re-execution: the part of this chunk the request already had once (its start
            # is what it holds now, by computation, prefix hit or copy-in).
            hwm = max(req.max_computed_tokens, chunk.start)
            req.num_recomputed_tokens += max(0, min(end, hwm) - chunk.start)
            req.max_computed_tokens = max(hwm, end)
            req.num_computed_tokens = end
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
        hashes = req.block_hashes(self.pool.block_size)
        for i in range(req._hashed_blocks, full):
            self.pool.register(req.block_ids[i], hashes[i])
        req._hashed_blocks = full

    # ---- memory hierarchy: host prefix tier and swap preemption (issue #4) -------------------
    def _preemption_mode(self, req: Request) -> str:
        """``"recompute"`` or ``"swap"`` for this victim: the policy's choice, else the
        config's."""
        return self.policy.preemption_mode(req) or self.config.preemption_mode

    def _lookup_host_hit(self, req: Request, first: int, usable: int) -> None:
        """Note the host blocks that continue ``req``'s device prefix hit (not taken yet)."""
        self._host_hit.pop(req.request_id, None)
        host = self.host_pool
        if host is None or first >= usable:
            return
        # With the prefix cache off, the host tier only gives a request back its own swap.
        if not (self.pool.enable_prefix_cache or req.request_id in self._swapped):
            return
        blocks = host.lookup_prefix(req._block_hashes[first:usable])
        if blocks:
            self._host_hit[req.request_id] = (first, blocks)

    def _admit_with_copy_in(self, req: Request, now: float) -> bool:
        """Admit ``req`` whose prefix continues in the host tier: allocate device blocks for
        those pages and emit an h2d copy. The request computes nothing until the copy lands
        (``on_copies_done``), so it can never attend pages still in flight. False, with
        nothing changed, when there is no host hit or no room for it."""
        hit = self._host_hit.pop(req.request_id, None)
        if hit is None or self.host_pool is None:
            return False
        first, host_blocks = hit
        m = min(len(host_blocks), self.pool.num_free)
        if m == 0 or not self._policy_admits(req, m):
            return False
        host_blocks = host_blocks[:m]
        dev = self.pool.allocate(m)
        req.block_ids.extend(dev)
        bs = self.pool.block_size
        landed = partial(self._copied_in, req.request_id, (first + m) * bs)
        copy = self.copies.issue("h2d", dev, host_blocks, f"h2d:{req.request_id}", self, landed)
        self._awaiting[req.request_id] = copy.tag
        if req.num_preemptions == 0 and req.first_scheduled_time is None:
            req.num_cached_tokens = (first + m) * bs
        self.waiting.remove(req)
        self.running.append(req)
        req.status = RequestStatus.RUNNING
        self._release_swap(req)  # the copy holds the host blocks from here on
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        return True

    def _swap_out(self, req: Request) -> int:
        """Swap preemption: copy ``req``'s full computed blocks to the host tier and retain
        them until it resumes (its resume finds them through the prefix lookup). Returns the
        tokens preserved; 0 means plain recompute (no host tier, recompute mode, host full)."""
        if self.host_pool is None or self._preemption_mode(req) != "swap":
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
        host = self.host_pool
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

    def _write_back(self, req: Request) -> None:
        """Copy the full blocks of a just-finished request's computed tokens that are still
        cached on the device and that the host tier lacks (LRU there, not retained)."""
        if self.host_pool is None:
            return
        bs = self.pool.block_size
        hashes = req.block_hashes(bs)[: req.num_computed_tokens // bs]
        q, h = self.pool.queries, self.pool.hits  # a write-back is not a cache lookup
        blocks = self.pool.lookup_prefix(hashes)
        self.pool.queries, self.pool.hits = q, h
        if blocks:
            self.offload_blocks(blocks, hashes[: len(blocks)], req.request_id, retain=False)

    def _swap_out_will_cover(self, req: Request, n: int) -> bool:
        """True when pages held only by in-flight copy-outs cover ``req``'s shortfall, so it
        should wait a step for them rather than preempt yet another request."""
        short = self._blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
        short -= self.pool.num_free
        # Only the core's own swap-outs count: a policy's copy-out may keep its pages pinned.
        held = {
            b
            for c in self.copies.copies_from(self, "d2h")
            for b in c.device_blocks
            if self.pool.ref_count(b) == 1
        }
        return 0 < short <= len(held)

    def _release_swap(self, req: Request) -> None:
        hashes = self._swapped.pop(req.request_id, None)
        if hashes and self.host_pool is not None:
            self.host_pool.release(hashes)

    def on_copies_done(self, done: Sequence[BlockCopy], failed: Sequence[BlockCopy] = ()) -> None:
        """The executor finished (``done``) or gave up on (``failed``) these copies (the core's
        and the policy's alike): see :class:`CopyTracker`."""
        self.copies.complete(done, failed)

    def _copied_in(self, request_id: str, computed_after: int, copy: BlockCopy, ok: bool) -> None:
        """A host prefix hit's copy-in ended: the request it still belongs to continues (after
        a failed copy it simply recomputes those tokens)."""
        req = self.requests.get(request_id)
        if req is not None and self._awaiting.get(request_id) == copy.tag:
            del self._awaiting[request_id]
            if ok:
                req.num_computed_tokens = computed_after
                self._register_full_blocks(req)

    # ---- agent-aware hooks (issue #5) ---------------------------------------------------------
    def _associate(self, request: Request) -> None:
        """Validate agent metadata (RequestRejected naming the field) and open its lifecycle.
        A :class:`LifecycleTicket` opens one for the record's metadata under its handle and
        leaves the request only its hints (``None``: an ordinary request to the policies)."""
        if isinstance(request.metadata, LifecycleTicket):
            t = request.metadata
            request.metadata = coerce_metadata(t.hints)
            self.lifecycle.associate(request.request_id, t.record, handle=t.handle)
            return
        request.metadata = coerce_metadata(request.metadata)
        m = request.metadata
        if m is None:
            return
        if m.lifecycle_id and m.lifecycle_id != request.request_id:
            raise RequestRejected(
                "metadata.lifecycle_id",
                f"metadata field 'lifecycle_id' ({m.lifecycle_id!r}) must equal the request id "
                f"({request.request_id!r})",
            )
        self.lifecycle.associate(request.request_id, m)

    def _on_generation_finished(self, req: Request, status: RequestStatus) -> None:
        """Before a finished request's blocks are released: snapshot its hashed prefix for its
        lifecycle (the successor's prefix) and let the policy act on the live blocks."""
        if req.metadata is None and req.request_id not in self.lifecycle.records:
            return
        ok = status is not RequestStatus.FINISHED_ABORTED
        if ok and req.metadata is not None:
            self.policy.on_generation_finished(req)
        snapshot = tuple(req._block_hashes[: req._hashed_blocks]) if ok else None
        self.lifecycle.generation_finished(req.request_id, ok, snapshot)

    def lifecycle_event(self, event: object) -> tuple[Disposition, dict]:
        """Apply one client tool-lifecycle event; the server maps the disposition to HTTP.
        An event that breaks on its lifecycle's data ends that lifecycle (a fault, cause
        ``error``) and answers ``invalid``; other lifecycles are untouched."""
        get = event.get if isinstance(event, dict) else lambda k: getattr(event, k, None)
        lid, name = get("lifecycle_id"), get("event")
        try:
            with blame(lid if isinstance(lid, str) else "", "the lifecycle event"):
                disp, body = self.lifecycle.handle(event)
        except RequestFault as fault:  # only raised once the event itself was validated
            self.fail(fault)
            return Disposition.INVALID, {
                "lifecycle_id": lid,
                "event": name,
                "disposition": Disposition.INVALID.value,
                "error": fault.message,
                "param": "lifecycle_id",
            }
        return disp, body
