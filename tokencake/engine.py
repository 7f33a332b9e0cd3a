"""The synchronous engine: a pure-Python loop of schedule -> execute -> postprocess.

``LLMEngine`` owns the scheduler (pure Python), the runner (all JAX calls) and the
per-request text state (``text_output.py``: detokenization, stop strings). It is
single-threaded; the asyncio front (``async_engine.py``) drives it from one dedicated thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from tokencake import multihost
from tokencake.choices import ChoiceGroups
from tokencake.config import EngineConfig
from tokencake.diagnostics import profile_step_costs
from tokencake.distributed import init_distributed
from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.memory.host_kv import allocate_host_kv
from tokencake.memory.host_pool import HostBlockPool
from tokencake.memory.kv_cache import KVCacheSpec
from tokencake.models.config import ModelConfig
from tokencake.models.tokenizer import IncrementalDetokenizer, Tokenizer
from tokencake.outputs import KVStats, RequestOutput, TokenLogprob
from tokencake.overlap import OverlapLoop
from tokencake.row_controls import RowControls
from tokencake.runner import EngineExecutor, ModelRunner, RowSampling, SampledToken
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.core import Scheduler, StepLoop
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.faults import RequestFault, StepFailed, blame
from tokencake.scheduler.lifecycle import Disposition, LifecycleEvent
from tokencake.scheduler.limits import check_id
from tokencake.scheduler.plan import StepPlan
from tokencake.scheduler.policy import PolicyFactory
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.structured import GrammarCompiler
from tokencake.text_output import TextState, error_output
from tokencake.toolcall.render import render_prompt
from tokencake.toolcall.request import ToolRequest

log = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching engine over one model. Not thread-safe: one caller drives ``step``."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model_config: ModelConfig | None = None,
        params: dict[str, np.ndarray] | None = None,
        tokenizer: Tokenizer | None = None,
        model_name: str | None = None,
        clock: Callable[[], float] | None = None,
        policy: PolicyFactory | None = None,
    ) -> None:
        """``clock`` (default ``time.monotonic``) drives the scheduler, the tool lifecycles and
        request arrival times, so tests can step the Time Scheduler deterministically;
        ``policy`` (a factory taking the scheduler's ``PolicyContext``) replaces the policy
        registered as ``config.policy``, e.g. one not in the registry."""
        self.config = config or EngineConfig()
        if self.config.distributed:
            init_distributed()
        if model_config is None:
            from tokencake.models.hub import resolve_model

            model_config, params, tokenizer, model_name = resolve_model(self.config.model)
        if params is None or tokenizer is None:
            raise ValueError("model_config, params and tokenizer must be given together")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_name = model_name or model_config.name or "model"
        cfg = self.config
        max_len = min(cfg.max_model_len, model_config.max_position_embeddings)
        num_pages = cfg.num_pages or KVCacheSpec.pages_for_bytes(
            int(cfg.kv_cache_gib * 2**30), model_config.num_layers, cfg.page_size,
            model_config.num_kv_heads, model_config.head_dim, cfg.dtype,
        )  # fmt: skip
        self.runner = ModelRunner(model_config, params, cfg.runner_config(num_pages, max_len))
        self.pool = BlockPool(num_pages, cfg.page_size, cfg.enable_prefix_cache)
        shards = len(self.runner.k.sharding.device_set)  # devices a block's KV heads span
        self.cost_model = CostModel(self.runner.kv_spec.bytes_per_page, shards=shards)
        self.host_pool: HostBlockPool | None = None
        self.transfer = None  # TransferEngine when the host tier is on
        if cfg.host_kv_gib > 0:
            self._build_host_tier()
        # Several processes: process 0 leads, the others replay its device calls (follow()).
        self.channel = multihost.attach(self.runner, self.transfer) if cfg.distributed else None
        self.scheduler = Scheduler(
            cfg.scheduler_config(max_len), self.pool, policy or cfg.policy, clock,
            self.host_pool, cost_model=self.cost_model, tokencake=cfg.tokencake,
        )  # fmt: skip
        self.executor = EngineExecutor(
            self.runner, self.transfer, self.scheduler.copies, self._sampling_of
        )
        self.loop = StepLoop(self.scheduler, self.executor)  # the simulator's loop too
        self.overlap = OverlapLoop(self) if cfg.overlap else None
        self.eos_ids = frozenset(model_config.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        self._text: dict[str, TextState] = {}
        self._ids = itertools.count()
        self._rng = random.Random(cfg.seed)
        self._grammars = GrammarCompiler(tokenizer, model_config.vocab_size, self.eos_ids)
        self._choices = ChoiceGroups()  # n > 1 requests
        self._stopped = False
        # Set once a device call across processes fails (multi-process runs only): every
        # process's KV must stay identical, so the engine stops for good (multihost.py).
        self.failure: multihost.ProcessGroupFailed | None = None
        self.stats = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "cached_tokens": 0}
        if cfg.warmup:
            self.warmup()

    def close(self) -> None:
        """Stop the engine's helper threads (the transfer waiter). Also happens when the
        engine is garbage-collected; idempotent."""
        if self.transfer is not None:
            self.transfer.close()
        if self.channel is not None and self.channel.leader and not self._stopped:
            self._stopped = True
            self.channel.stop()  # the followers return from follow()

    def follow(self) -> int:
        """A follower process (rank > 0 of a ``distributed`` run): replay the leader's device
        calls until its engine closes; returns how many ran. Never schedules."""
        if self.channel is None or self.channel.leader:
            raise RuntimeError("follow() is for the non-leading processes of a distributed run")
        return multihost.follow(self.channel, self.runner, self.transfer)

    def warmup(self, progress: bool = False) -> None:
        """Compile every step and transfer shape (``progress``: a bar on stderr) and profile
        recompute costs where they are used. Runs at construction unless ``warmup=False``."""
        self._grammars.prepare_in_background()  # else the first structured request waits ~2 s
        self.runner.warmup(progress=progress)
        if self.transfer is not None:
            self.transfer.warmup()
        if self.channel is not None:
            self.channel.barrier("warm")  # all compiled: from here on calls launch together
            if not self.channel.leader:
                return  # the leader's profiling steps reach this process through follow()
        if self.config.policy != "vllm" or self.transfer is not None:
            # Only the agent-aware policies and the host tier consult recompute costs;
            # profiling costs seconds of start-up, so the FCFS baseline skips it.
            # With the floor under which prefill tokens ride free (stall-free prefill). On a CPU
            # the fitted prefill intercept is above it (131 vs 41 ms here): no room, no change.
            profile_step_costs(self.runner, self.cost_model)

    def _build_host_tier(self) -> None:
        """Host block pool, host KV arrays (allocated once; sharded like the device cache, so
        each device's KV heads get their own host copy) and the transfer engine."""
        from tokencake.memory.transfer import TransferEngine

        cfg = self.config
        spec = self.runner.kv_spec
        self.host_pool = HostBlockPool.for_budget(
            int(cfg.host_kv_gib * 2**30), spec.bytes_per_page, cfg.page_size
        )
        host_kv = allocate_host_kv(spec, self.host_pool.num_blocks, sharding=self.runner.k.sharding)
        self.transfer = TransferEngine(self.runner, host_kv, self.cost_model.bandwidth)

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        metadata: Any = None,
    ) -> str:
        """Queue a request; returns its id. Bad input raises :class:`RequestRejected` naming
        it (nothing queued); after a distributed run lost a process, its failure is raised."""
        if self.failure is not None:
            raise self.failure
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        token_ids = self.tokenize(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        check_id("request_id", request_id)
        member_ids = [ChoiceGroups.member_id(request_id, i) for i in range(params.n)]
        if any(m in self._text for m in member_ids):
            raise RequestRejected(
                "request_id", f"duplicate request id {request_id!r}", 409, "duplicate_request_id"
            )
        states = [self._text_state(params, token_ids, i) for i in range(params.n)]
        eos = frozenset() if params.ignore_eos else self.eos_ids
        eos |= frozenset(params.stop_token_ids)
        req = Request(
            request_id, token_ids, params.max_tokens, self.scheduler.clock(),
            eos_token_ids=eos, metadata=metadata,
        )  # fmt: skip
        self.scheduler.add_request(req)  # validates lengths; raises before any state changes
        # Choices 1.. join once choice 0 has computed the prompt (see choices.py); agent
        # hints and the tool lifecycle stay with choice 0.
        children = [
            Request(m, list(token_ids), params.max_tokens, req.arrival_time, eos_token_ids=eos)
            for m in member_ids[1:]
        ]
        if children:
            self._choices.add(request_id, children)
        for m, state in zip(member_ids, states, strict=True):
            self._text[m] = state
        self.stats["prompt_tokens"] += len(token_ids) * params.n
        return request_id

    def _text_state(self, params: SamplingParams, prompt: list[int], index: int) -> TextState:
        if params.seed is None:
            seed = self._rng.randrange(2**31)
        else:  # distinct, reproducible streams per choice
            seed = (params.seed + index) % 2**31
        return TextState(
            params, seed, IncrementalDetokenizer(self.tokenizer),
            controls=self._controls_for(params, prompt), index=index,
        )  # fmt: skip

    def _controls_for(self, params: SamplingParams, prompt: list[int]) -> RowControls | None:
        """Host state of the request's logit adjustments; None (no per-step work) if unused.
        Raises :class:`RequestRejected` for a bias on a token outside the vocabulary and
        its subclass ``GrammarError`` for a structured-output spec that does not compile."""
        if not params.uses_logit_controls:
            return None
        vocab = self.model_config.vocab_size
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise RequestRejected(
                "logit_bias", f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        grammar = None
        if params.structured is not None:
            grammar = self._grammars.compile(params.structured)
        return RowControls(
            prompt=prompt,
            capacity=self.runner.penalty_capacity,
            presence=params.presence_penalty,
            frequency=params.frequency_penalty,
            repetition=params.repetition_penalty,
            logit_bias=params.logit_bias,
            grammar=grammar,
        )

    def tokenize(self, prompt: str | list[int], tokenizer: Tokenizer | None = None) -> list[int]:
        """Token ids of a text prompt, or a token-id prompt checked against the vocabulary.
        Bad input raises :class:`RequestRejected` on ``prompt``. Reads no engine state, so
        another thread may call it with its own ``tokenizer`` (``AsyncEngine.tokenize``)."""
        if isinstance(prompt, str):
            token_ids = (tokenizer or self.tokenizer).encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = list(prompt)
        else:
            raise RequestRejected("prompt", "prompt must be a string or a list of token ids")
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected(
                "prompt", f"token id {bad} is outside the vocabulary [0, {vocab})"
            )
        if not token_ids:
            raise RequestRejected("prompt", "prompt is empty")
        return token_ids

    def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tool_request: ToolRequest | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template. With a
        ``tool_request`` its validated conversation (tool calls and results included) and tools
        are rendered instead, through the template or the fallback prompt
        (:mod:`tokencake.toolcall.render`). A conversation the template refuses (e.g. roles
        that must alternate) raises :class:`RequestRejected` on ``messages``."""
        import jinja2  # the chat template's own refusals are jinja2 errors

        try:
            tok = tokenizer or self.tokenizer
            if tool_request is None:
                return list(tok.apply_chat_template(messages, add_generation_prompt))
            text, _ = render_prompt(
                tok,
                list(tool_request.messages),
                tool_request.tools,
                tool_request.choice,
                add_generation_prompt,
            )
            # Templates write BOS/special tokens themselves: no post-processor additions.
            return tok.encode(text, add_special_tokens=False)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise RequestRejected("messages", f"messages: {exc}") from None

    def kv_stats(self) -> KVStats:
        """Device KV pool and queue occupancy now (call from the engine's thread)."""
        return KVStats(
            capacity=self.pool.capacity,
            used=self.pool.num_used,
            cached=self.pool.num_cached,
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
        )

    def abort_request(self, request_id: str) -> bool:
        """Abort a request (every choice); its blocks are freed. False if it is unknown or
        already done."""
        found = False
        for m in self._choices.members(request_id):
            self._text.pop(m, None)
            found |= self.scheduler.abort(m) is not None
        self._choices.drop(request_id)
        return found

    def lifecycle_event(self, event: LifecycleEvent | dict) -> tuple[Disposition, dict]:
        """Apply one tool-lifecycle event (``stall_started`` / ``stall_finished``, paper §8.2).

        Returns the disposition (``.http_status`` is what the server answers) and the body
        ``{lifecycle_id, event, state, disposition}``. Call from the engine's thread.
        """
        return self.scheduler.lifecycle_event(event)

    def set_overlap(self, on: bool) -> None:
        """Turn overlap scheduling (``EngineConfig.overlap``, its initial state) on or off
        while no step is in flight, e.g. to compare both on one warmed-up engine."""
        if self.overlap is not None:
            self.overlap.settle()  # a step left only by finished requests
            if self.overlap.in_flight is not None:
                raise RuntimeError("set_overlap: a step is in flight; finish the requests first")
        if on:
            dataclasses.replace(self.config, overlap=True)  # raises where overlap is unsupported
        self.overlap = OverlapLoop(self) if on else None

    def has_unfinished_requests(self) -> bool:
        return (
            self.scheduler.has_work
            or self.scheduler.copies.in_flight > 0
            or (self.overlap is not None and self.overlap.live)
        )

    def seconds_until_timer(self) -> float:
        """Seconds until the scheduler has timed work with no request running (a predictive
        upload, a keep's TTL, a lifecycle deadline); <= 0 means step now, ``inf`` never. A
        driver that idles while ``has_unfinished_requests()`` is False must still call
        :meth:`step` by then, or tool-call KV is uploaded only when the successor arrives."""
        return self.scheduler.next_timer() - self.scheduler.clock()

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns outputs for every request that progressed or ended.

        A request aborted by a fault (its own data broke scheduling, a policy or
        postprocessing) comes back finished with ``error`` set; the others are unaffected.
        If the device step itself fails, only that step's requests are aborted
        (``error`` is a :class:`StepFailed`). Choices of an ``n > 1`` request report under
        its id with their ``index`` (see :class:`RequestOutput`)."""
        if self.failure is not None:
            raise self.failure
        return self.run_step(self.plan_step())

    def plan_step(self) -> StepPlan:
        """The first phase of :meth:`step`: report landed copies and schedule. An observer
        (the benchmark's metrics) may read the plan before :meth:`run_step` executes it."""
        return self.loop.plan()

    def run_step(self, plan: StepPlan) -> list[RequestOutput]:
        """The rest of :meth:`step`: execute ``plan``, update, detokenize and stop. With
        ``overlap`` on, ``plan`` is dispatched and the outputs are the step before's
        (``tokencake/overlap.py``)."""
        outputs = self._run(plan) if self.overlap is None else self.overlap.run(plan)
        return self._choices.relabel(outputs) if self._choices else outputs

    def _run(self, plan: StepPlan) -> list[RequestOutput]:
        outputs = self._fault_outputs()
        try:
            tokens = self.loop.execute(plan)
        except Exception as exc:
            if self.channel is not None:
                return outputs + self._fail_group(exc)
            return outputs + self._fail_step(plan, exc)
        if not plan.chunks:
            return outputs
        produced = self.loop.update(plan, tokens)
        return outputs + self._outputs(produced, self.executor.samples)

    def _outputs(self, produced: list[Request], sampled: dict[str, SampledToken]) -> list:
        """Postprocess a finished step's new tokens (``produced`` got one each); a request
        whose postprocessing breaks is aborted alone. Then every fault's error output."""
        outputs = []
        self.stats["steps"] += 1
        for req in produced:
            state = self._text.get(req.request_id)
            if state is None:
                continue
            try:
                with blame(req, "postprocessing"):
                    outputs.append(self._postprocess(req, state, sampled[req.request_id]))
            except RequestFault as fault:
                self.scheduler.fail(fault)  # aborts it unless it had already finished
                if self._text.pop(req.request_id, None) is not None:
                    outputs.append(error_output(req, fault))
        return outputs + self._fault_outputs()

    def _fault_outputs(self) -> list[RequestOutput]:
        """Finished outputs carrying the error of every request a fault aborted."""
        out = []
        for req, fault in self.scheduler.faults.pop():
            if req is not None and self._text.pop(req.request_id, None) is not None:
                out.append(error_output(req, fault))
        return out

    def _fail_step(self, plan, exc: Exception) -> list[RequestOutput]:
        """The device step failed: abort its rows (only those) with a :class:`StepFailed`."""
        log.error("device step failed; aborting the %d requests of that step", len(plan.chunks),
                  exc_info=exc)  # fmt: skip
        err = StepFailed(f"the engine step failed ({type(exc).__name__})")
        out = []
        for c in plan.chunks:
            req = c.request
            if not req.status.finished:
                self.scheduler.abort(req.request_id)
            if self._text.pop(req.request_id, None) is not None:
                out.append(error_output(req, err))
        return out

    def _fail_group(self, exc: Exception) -> list[RequestOutput]:
        """A device call across processes failed (a process died or lost contact): the other
        processes' KV can no longer be trusted, so every request in flight ends with a
        :class:`~tokencake.multihost.ProcessGroupFailed` and the engine stops (``failure``)."""
        log.error("a device call across the processes of the distributed run failed (%s: %s); "
                  "failing every request in flight and stopping", type(exc).__name__, exc)  # fmt: skip
        err = multihost.ProcessGroupFailed(
            "a process of the distributed run failed (a device call across processes raised "
            f"{type(exc).__name__}); the engine stopped"
        )
        err.__cause__ = exc
        self.failure = err
        out = []
        for rid in list(self._text):
            req = self.scheduler.abort(rid)
            if self._text.pop(rid, None) is not None and req is not None:
                out.append(error_output(req, err))
        return out

    # ---- the memory hierarchy -------------------------------------------------------------
    def sync_transfers(self) -> None:
        """Wait for every KV copy in flight and report it to the scheduler."""
        self.executor.wait_copies()
        self.loop.report_copies()

    def _sampling_of(self, req: Request) -> RowSampling:
        state = self._text[req.request_id]
        p = state.params
        return RowSampling(
            p.temperature, p.top_k, p.top_p, state.seed, bool(p.logprobs), p.min_p, state.controls
        )

    def _postprocess(self, req: Request, state: TextState, s) -> RequestOutput:
        """Logprobs, detokenization and stop conditions for ``req``'s new token ``s``."""
        params = state.params
        tok = req.output_token_ids[-1]
        self.stats["generation_tokens"] += 1
        if state.controls is not None:
            state.controls.accept(tok)
        for child in self._choices.release(req.request_id):
            self.scheduler.add_request(child)  # the prompt's full blocks are cached now
        if params.logprobs is not None:
            top = tuple(
                zip(
                    s.top_ids[: params.logprobs].tolist(),
                    s.top_logprobs[: params.logprobs].tolist(),
                    strict=True,
                )
            )
            state.logprobs.append(TokenLogprob(tok, s.logprob, top))
        if tok in req.eos_token_ids or state.feed(tok):
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        elif not req.status.finished and req.num_tokens >= self.max_model_len:
            self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
        out = state.output(req)
        if req.status.finished:
            self._text.pop(req.request_id, None)
            self.stats["cached_tokens"] += req.num_cached_tokens
        return out
