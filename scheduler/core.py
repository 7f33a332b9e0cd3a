"""Continuous-batching scheduler core: waiting/running queues, token budget, chunked prefill,
prefix-cache hits and recompute preemption. Pure Python;
the policy plugs in decisions.

Invariant kept by every method: a running request owns exactly the blocks covering its
``num_computed_tokens`` (plus those for the tokens scheduled this step), and every block it owns
is accounted for in the pool (``check_integrity``).

:class:`StepLoop` (schedule -> execute -> update) is shared by the engine and the simulator;
the executor is the only difference between a real and a simulated step (DESIGN.md rule 4).
``SchedulerConfig`` (the batch limits) lives in ``config.py`` and ``StepLoop`` in
``step_loop.py``; both are re-exported here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from functools import partial
from operator import attrgetter

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.config import SchedulerConfig
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.faults import FaultLog, RequestFault, blame, find_culprits
from tokencake.scheduler.host_tier import HostTier
from tokencake.scheduler.inferred import ToolCallIndex, open_lifecycle
from tokencake.scheduler.lifecycle import Disposition, Lifecycle
from tokencake.scheduler.limits import check_fits
from tokencake.scheduler.plan import ScheduledChunk, StepPlan
from tokencake.scheduler.policies import policy_factory
from tokencake.scheduler.policy import Admission, PolicyContext, PolicyFactory
from tokencake.scheduler.request import PENDING_TOKEN, Request, RequestStatus
from tokencake.scheduler.stall_free import capped_chunk
from tokencake.scheduler.tokencake_config import TokencakeConfig
from tokencake.scheduler.waiting_queue import WaitingQueue

_ARRIVAL = attrgetter("arrival_time")
_RUNNING = RequestStatus.RUNNING
_new_chunk = tuple.__new__  # ScheduledChunk(*fields) without a Python frame per chunk
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
        # Host prefix hits, swap-outs and write-backs (no-ops without a host pool).
        self.host_tier = HostTier(pool, host_pool, self.copies, self._copied_in)
        self._refused: tuple[str, Admission] | None = None  # latest refusal this admission pass
        self.clock = clock or time.monotonic
        # A list that logs its appends and removes: per-step consumers read a step's changes
        # instead of passing over the whole queue (waiting_queue.py).
        self.waiting: WaitingQueue = WaitingQueue()
        # A plain list: a logged one held finished requests alive in its log, and freed them
        # in bursts inside schedule() when the log was trimmed (bench/RESULTS.md, #17 item 4,
        # "Ninth round").
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.faults = FaultLog()  # requests aborted by a fault, for the engine to report
        self._admitting: Request | None = None  # the admission candidate being worked on
        tokencake = tokencake or TokencakeConfig()
        # Tool-call lifecycles live here for every policy (the baseline only tracks them).
        self.lifecycle = Lifecycle(self.clock, tokencake.offload)
        # Lifecycles inferred from the tool-calling protocol feed the same records (rule 10).
        self.tool_calls = ToolCallIndex(self.lifecycle)
        self.cost_model = cost_model or CostModel.paper_default()
        factory = policy_factory(policy) if isinstance(policy, str) else policy
        context = PolicyContext(
            config, pool, host_pool, self.cost_model, self.clock, self.lifecycle, self.copies,
            tokencake,
        )  # fmt: skip
        self.policy = factory(context)

    # ---- queue management -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise RequestRejected(
                "request_id", f"duplicate request id {rid!r}", 409, "duplicate_request_id"
            )
        check_fits(request.num_prompt_tokens, request.max_tokens, self.config.max_model_len,
                   self.pool.block_size, self.pool.capacity)  # fmt: skip
        open_lifecycle(self.lifecycle, request)  # validates its metadata first
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
        if req.num_pending:  # its last token never comes back (overlap): drop the placeholder
            del req.output_token_ids[-req.num_pending :]
            req.num_pending = 0
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        try:
            with blame(req, "the finish hooks"):
                self._on_generation_finished(req, status)
        except RequestFault as fault:
            self.faults.log(fault)
            self.lifecycle.generation_finished(req.request_id, ok=False)
        self._release(req)
        self.host_tier.release_swap(req)
        if status is not RequestStatus.FINISHED_ABORTED and self.policy.writes_back(req):
            self.host_tier.write_back(req)
        req.status = status
        req.finish_time = self.clock()
        self.requests.pop(req.request_id, None)
        try:
            with blame(req, "the policy's finish hook"):
                self.policy.on_finished(req)
        except RequestFault as fault:
            self.faults.log(fault)

    # ---- fault isolation (DESIGN.md rule 8) --------------------------------------------------
    def fail(self, fault: RequestFault) -> None:
        """Abort the request ``fault`` names (its blocks are freed, its lifecycle ends) and
        record the fault for the engine to report; every other request keeps running. A fault
        naming a lifecycle whose request has already finished ends that lifecycle."""
        self.faults.log(fault)
        req = self.requests.get(fault.request_id)
        if req is None:
            self.lifecycle.fail(fault.request_id)
            self.faults.report(None, fault)
            return
        if req.status is RequestStatus.WAITING and req.block_ids:
            self._release(req)  # a half-done admission: restore "waiting owns no blocks"
            req.num_computed_tokens = 0
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        self.faults.report(req, fault)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_timer(self) -> float:
        """Clock time at which an idle scheduler should run ``schedule()`` anyway: the
        policy's timed work (Time Scheduler uploads, TTLs) and lifecycle deadlines."""
        return min(self.policy.next_due(), self.lifecycle.next_deadline)

    # ---- block accounting -------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.pool.block_size)

    def _release(self, req: Request) -> None:
        self.host_tier.forget(req.request_id)
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
        swap mode the full blocks are first copied to the host tier (``HostTier.swap_out``)."""
        self.running.remove(req)
        mode = self.policy.preemption_mode(req) or self.config.preemption_mode  # pure hook
        if self.host_pool is not None and mode == "swap":
            # Tokens kept on the host are not recomputed (``update`` counts what is).
            self.host_tier.swap_out(req)
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
        self.host_tier.note_hit(req, len(hits), usable)

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Choose this step's chunks (decode tokens first, then prefill chunks).

        Fault isolation (DESIGN.md rule 8): an exception caused by one request's data aborts
        that request and the step is planned again without it; other requests never see it
        (how the culprit is found: ``scheduler/faults.py``). Between attempts the core's
        invariants hold: every mutation before a failure leaves a consistent state (an
        admitted request owns its blocks; a preempted one is requeued) and a half-admitted
        candidate's prefix-hit blocks are released.
        """
        for _ in range(MAX_FAULT_RETRIES):
            try:
                return self._schedule()
            except RequestFault as fault:
                self._rollback_admission()
                self.fail(fault)
            except Exception as exc:
                candidate = self._rollback_admission()
                culprits = find_culprits(
                    self.requests.values(), self.lifecycle, self.policy.check_request, self.clock()
                )
                if not culprits and candidate is not None:
                    culprits = [RequestFault(candidate.request_id, "admission", exc)]
                if not culprits:
                    raise
                for fault in culprits:
                    self.fail(fault)
        return self._schedule()

    def _make_room(self, plan: StepPlan, req: Request, n: int) -> bool:
        """Grow ``req`` by ``n`` tokens, preempting victims; False if ``req`` cannot run now."""
        while not self._grow(req, req.num_computed_tokens + n):
            short = self._blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
            if self.host_tier.swap_outs_will_cover(short - self.pool.num_free):
                return False  # victims' pages free up once their copy-out lands
            if self.policy.release_for_growth(short - self.pool.num_free):
                continue  # held pages no running request reads were let go
            victim = self.policy.choose_victim(self.running, req)
            if victim is None or victim is req:
                self._preempt(req)
                plan.preempted.append(req)
                return False
            self._preempt(victim)
            plan.preempted.append(victim)
            plan.chunks = [c for c in plan.chunks if c.request is not victim]
        return req.status is RequestStatus.RUNNING

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
        # Prefill tokens this step may carry (the policy's cap; never above the budget).
        # The cap counts tokens of bare compute: a capped chunk is priced with its attention
        # over the context before it, and the first gets at least a block (``capped_chunk``).
        cap = self.policy.prefill_cap(self.running)
        prefill_left = budget if cap is None else min(cap, budget)
        in_room = None  # capped: (room left, context, n) -> (tokens, room used)
        if cap is not None:
            in_room = partial(capped_chunk, self.cost_model, prefill_left, self.pool.block_size)

        # 1. Running requests, oldest first; preempt per policy when blocks run out. Hot loop
        # (256 rows a step): the common case (a decode row whose next token fits its last
        # block) is inlined, with locals for everything it reads.
        pool = self.pool
        bs, awaiting = pool.block_size, self.host_tier.awaiting
        chunk, max_prefill_rows = cfg.max_prefill_chunk, cfg.max_prefill_seqs
        chunks = plan.chunks
        for req in sorted(self.running, key=_ARRIVAL):
            if budget <= 0:
                break
            if req.status is not _RUNNING or (awaiting and req.request_id in awaiting):
                continue  # preempted as a victim this step, or its prefix pages are in flight
            num_out = len(req.output_token_ids)
            if req.num_pending and num_out >= req.max_tokens:
                continue  # its last token is in flight (overlap): nothing left to compute
            start = req.num_computed_tokens
            left = len(req.prompt_token_ids) + num_out - start
            if left > 1:  # a prefill row takes a chunk
                n = used = min(left, chunk, budget, prefill_left)
                if in_room is not None:
                    n, used = in_room(prefill_left, start, n)
                if n <= 0 or (n > 1 and prefill_rows >= max_prefill_rows):
                    continue
                prefill_left -= used
            else:
                n = 1
            if start + n > len(req.block_ids) * bs:
                # ``_grow`` inlined for the usual case (a decode row entering its next block,
                # ~16 rows a step): the pool has the blocks. Else ``_make_room`` preempts.
                need = -(-(start + n) // bs) - len(req.block_ids)
                if need <= pool.num_free:
                    req.block_ids.extend(pool.allocate(need))
                else:
                    if not self._make_room(plan, req, n):
                        chunks = plan.chunks  # a victim's chunk may have been dropped
                        continue
                    chunks = plan.chunks
            chunks.append(_new_chunk(ScheduledChunk, (req, start, n)))
            budget -= n
            if n > 1:
                prefill_rows += 1

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
                        min(budget, prefill_left) <= 0
                        or len(self.running) >= cfg.max_num_seqs
                        or prefill_rows >= cfg.max_prefill_seqs
                    ):
                        break
                    self._apply_prefix_hit(req)
                    if self._admit_with_copy_in(req, now):
                        self.policy.on_admitted(req, now)
                        continue  # admitted; its first chunk runs once the host pages have landed
                    n = used = min(
                        req.remaining_tokens, cfg.max_prefill_chunk, budget, prefill_left
                    )
                    if in_room is not None:
                        n, used = in_room(prefill_left, req.num_computed_tokens, n)
                        if n <= 0:  # its context leaves no room in this step
                            self._release(req)
                            req.num_computed_tokens = 0
                            break
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
                    self._start_running(req, now)
                    self.policy.on_admitted(req, now)
                    plan.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                    budget -= n
                    prefill_left -= used
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
            if self._advance_chunk(chunk) and chunk.request.request_id in sampled:
                req = chunk.request
                req.output_token_ids.append(sampled[req.request_id])
                self._took_token(req, now, produced)
        return produced

    # ---- overlap scheduling: update in two halves around the device step ------------------
    def advance(self, plan: StepPlan) -> list[Request]:
        """The first half of :meth:`update`, right after ``plan`` was dispatched and before
        its tokens are read: progress advances as if the step had run, and every request
        whose chunk samples gets a :data:`PENDING_TOKEN`, so the next :meth:`schedule` plans
        its decode row (and allocates its next block) now. Returns those requests, for
        :meth:`resolve`. Assumes the step succeeds; a failed step aborts its requests."""
        pending = []
        for chunk in plan.chunks:
            if self._advance_chunk(chunk):
                req = chunk.request
                req.output_token_ids.append(PENDING_TOKEN)
                req.num_pending += 1
                pending.append(req)
        return pending

    def resolve(self, pending: list[Request], sampled: Mapping[str, int]) -> list[Request]:
        """The second half of :meth:`update`: fill in the tokens :meth:`advance` left pending
        with the step's sampled ``sampled``. A request finished meanwhile (an abort) had its
        placeholder removed by :meth:`finish` and is skipped; one preempted meanwhile keeps
        its token (its recompute includes it). Returns the requests that got a token."""
        now = self.clock()
        produced = []
        for req in pending:
            if req.status.finished or not req.num_pending:
                continue
            req.output_token_ids[-1] = sampled[req.request_id]
            req.num_pending -= 1
            self._took_token(req, now, produced)
        return produced

    def _advance_chunk(self, chunk: ScheduledChunk) -> bool:
        """Progress of one executed chunk; True if it sampled a token for a running request."""
        req = chunk.request
        if req.status is not RequestStatus.RUNNING:
            return False  # aborted while the step ran
        end = chunk.start + chunk.num_tokens
        # Re-execution: the part of this chunk the request already had once (its start
        # is what it holds now, by computation, prefix hit or copy-in).
        hwm = max(req.max_computed_tokens, chunk.start)
        req.num_recomputed_tokens += max(0, min(end, hwm) - chunk.start)
        req.max_computed_tokens = max(hwm, end)
        req.num_computed_tokens = end
        self._register_full_blocks(req)
        return chunk.samples

    def _took_token(self, req: Request, now: float, produced: list[Request]) -> None:
        """Bookkeeping of a token just appended to ``req``: first-token time, length limit."""
        if req.first_token_time is None:
            req.first_token_time = now
        produced.append(req)
        if len(req.output_token_ids) >= req.max_tokens:
            self.finish(req, RequestStatus.FINISHED_LENGTH)

    def _register_full_blocks(self, req: Request) -> None:
        full = req.num_computed_tokens // self.pool.block_size
        if full <= req._hashed_blocks:
            return
        hashes = req.block_hashes(self.pool.block_size)
        for i in range(req._hashed_blocks, full):
            self.pool.register(req.block_ids[i], hashes[i])
        req._hashed_blocks = full

    def _start_running(self, req: Request, now: float) -> None:
        """Move an admitted ``req`` from waiting to running."""
        self.waiting.remove(req)
        self.running.append(req)
        req.status = RequestStatus.RUNNING
        self.host_tier.release_swap(req)  # its blocks (or its copy-in) hold the pages now
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now

    # ---- the host tier (issue #4; the mechanics are in host_tier.py) ---------------------------
    def _admit_with_copy_in(self, req: Request, now: float) -> bool:
        """Admit ``req`` whose prefix continues in the host tier: device blocks for those
        pages and a copy-in. The request computes nothing until the copy lands, so it can
        never attend pages still in flight. False, with nothing changed, when there is no
        host hit or no room for it."""
        hit = self.host_tier.take_hit(req)
        if hit is None:
            return False
        first, host_blocks = hit
        m = min(len(host_blocks), self.pool.num_free)
        if m == 0 or not self._policy_admits(req, m):
            return False
        self.host_tier.copy_in(req, first, host_blocks[:m])
        if req.num_preemptions == 0 and req.first_scheduled_time is None:
            req.num_cached_tokens = (first + m) * self.pool.block_size
        self._start_running(req, now)
        return True

    def _copied_in(self, request_id: str, computed_after: int) -> None:
        """A host prefix hit's copy-in landed: the request continues past those pages."""
        req = self.requests.get(request_id)
        if req is not None:
            req.num_computed_tokens = computed_after
            self._register_full_blocks(req)

    # ---- agent-aware hooks (issue #5) ---------------------------------------------------------
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
            body = {"lifecycle_id": lid, "event": name, "disposition": Disposition.INVALID.value}
            return Disposition.INVALID, {**body, "error": fault.message, "param": "lifecycle_id"}
        return disp, body


# The step loop lives in step_loop.py; imported last (it names Scheduler only for typing) and
# re-exported, since the engine, the simulator and the benchmarks import it from here.
from tokencake.scheduler.step_loop import StepLoop  # noqa: E402

__all__ = ["Scheduler", "SchedulerConfig", "StepLoop"]
