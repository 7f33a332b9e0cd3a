"""Drive a :class:`~bench.workload.Workload` against a backend: arrivals, DAG dependencies,
append-only prompt composition, tool calls and lifecycle events.

One single-threaded event loop serves both clocks:

* :class:`SimBackend` — the shared scheduler core with a simulated executor on a **virtual
  clock** (paper-scale runs in seconds of CPU time);
* :class:`EngineBackend` — the real in-process :class:`~tokencake.engine.LLMEngine` on the
  **wall clock** (tools really wait; the engine keeps stepping while they do).

Both receive token ids, never text, so every policy sees byte-identical prompts: synthetic
lengths (``prompt_tokens`` / ``result_tokens``) become filler tokens derived from
``(seed, app id, node id)``, literal texts go through the backend's tokenizer, and a
successor's prompt is its predecessor's token list plus the new tokens (the append-only rule of
``WORKLOAD_FORMAT.md``), so prefix caching applies exactly as it would for a real client.
Joins keep the predecessors' longest common token prefix once, then each branch's suffix in
``deps`` order.

Per node the driver sends the agent metadata a client would (graph facts, the authors'
per-node hints from ``node.metadata``, application timing) and, for a node with a tool,
``stall_started`` (with the estimate only when the workload has one) once the generation is
done and ``stall_finished`` when the tool's true duration (with its seeded noise) has passed.
The HTTP path uses :mod:`tokencake.runtime` instead (see ``bench/run.py``).

An application whose ``client`` is ``tool-calling`` (or every application, with the driver's
``client`` override) sends neither metadata nor events, as a plain OpenAI tool-calling client:
its call opens an inferred lifecycle (no hints for the policies), a call followed by a tool
"responds" with one tool call of the tool's kind, and the successor's request carries the
result, which is when the server learns that the tool returned (issue 14; the same transitions
the HTTP server makes from ``tool_calls`` and ``tool`` messages, ``tokencake.server.lifecycles``).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bench.workload import Application, Node, Workload
from tokencake.scheduler.inferred import LifecycleTicket
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.plan import StepPlan


def system_prompt_identity(agent_type: str) -> str:
    """The identity the server infers for a tool-calling client's agent: a hash of its system
    prompt (``tokencake.server.lifecycles.agent_identity``). Agent frameworks send each agent
    kind's instructions as its system prompt; synthetic workloads have no such text, so the
    driver stands one in per agent type (the type itself is never sent)."""
    instructions = f"You are the {agent_type} agent."
    return "system:" + hashlib.sha256(instructions.encode()).hexdigest()[:16]


_META_FIELDS = {f for f in AgentMetadata.__dataclass_fields__ if f != "extra"}


# ---- token materialisation ---------------------------------------------------------------
def filler_tokens(n: int, key: str, vocab_size: int, low: int = 3) -> list[int]:
    """``n`` deterministic pseudo-random token ids for ``key`` (distinct keys share no prefix).

    Ids are drawn from ``[low, vocab_size)`` so special ids (pad/bos/eos at 0..2 in most
    vocabularies) never appear and an engine never stops early on a filler.
    """
    if n <= 0:
        return []
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    return rng.integers(low, vocab_size, size=n).tolist()


#: Characters per token of the authors' texts, measured from their own file: the 24 initial
#: inputs' characters over their ``context_token_count`` sum to a ratio of 3.85.
SIM_CHARS_PER_TOKEN = 3.85
SIM_EPOCH_S = 1000.0  # what the simulated clock reads when a run starts (see SimBackend)


def hashed_text_tokens(
    text: str, vocab_size: int, chars_per_token: float = SIM_CHARS_PER_TOKEN
) -> list[int]:
    """A stand-in tokenizer for the simulator: one token per ``chars_per_token`` characters
    (the authors' measured ratio), each id a hash of its piece so equal texts give equal
    tokens (prefix sharing between applications is what the real texts imply)."""
    n = max(1, round(len(text) / chars_per_token)) if text else 0
    out = []
    for k in range(n):
        i, j = round(k * chars_per_token), round((k + 1) * chars_per_token)
        h = hashlib.blake2b(text[i:j].encode(), digest_size=4).digest()
        out.append(3 + int.from_bytes(h, "little") % (vocab_size - 3))
    return out


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token lists."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def compose(contexts: list[list[int]], own: list[int]) -> list[int]:
    """Append-only composition: single predecessor = its context + own; join = common prefix
    once + each branch's suffix in order + own; root = own."""
    if not contexts:
        return list(own)
    if len(contexts) == 1:
        return contexts[0] + own
    k = common_prefix_len(contexts)
    out = list(contexts[0][:k])
    for c in contexts:
        out.extend(c[k:])
    return out + own


# ---- metadata -----------------------------------------------------------------------------
def node_metadata(app: Application, node: Node, lifecycle_id: str) -> dict[str, Any]:
    """The static part of a node's wire metadata: graph facts, overlaid with the workload's
    per-node hints (the authors' loader and the generators put ``offload_eligible``,
    ``critical_path``, ``memory_weight``… in ``node.metadata``; those win)."""
    max_depth = app.max_depth + 1  # the authors' ``application_max_depth`` (16-node chain -> 17)
    depth = app.depth(node.id)
    md: dict[str, Any] = {
        "lifecycle_id": lifecycle_id,
        "agent_type": node.agent_type,
        "agent_name": node.agent_name,
        "importance": float(node.importance),
        "depth": depth,
        "dependency_depth": depth,
        "in_degree": app.in_degree(node.id),
        "out_degree": app.out_degree(node.id),
        "application_max_depth": max_depth,
        "remaining_depth": max(0, max_depth - depth),
        "critical_path": app.critical_path(node.id),
        "near_completion": app.remaining_depth(node.id) <= max(1, max_depth // 4),
        "join_group": node.join_group or "",
        "fanout_width": max((app.out_degree(d) for d in node.deps), default=1),
        "similarity": 1.0,
        "offload_eligible": node.tool is not None,
        "reusable_prefix": app.out_degree(node.id) > 0,
    }
    for k, v in node.metadata.items():
        if k in _META_FIELDS and k != "lifecycle_id":
            md[k] = v
    if "offload_eligible" in node.metadata and "reusable_prefix" not in node.metadata:
        # The authors set both flags together (paper digest §9.2, column "Off").
        md["reusable_prefix"] = bool(node.metadata["offload_eligible"])
    md["application_max_depth"] = max(
        int(md["application_max_depth"]), int(md["depth"]), int(md["remaining_depth"])
    )
    md["fanout_width"] = max(1, int(md["fanout_width"]))
    return md


# ---- backends -------------------------------------------------------------------------------
@dataclass
class Completion:
    """What a backend reports for one finished LLM call."""

    request_id: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from a cache at first admission
    ttft_s: float | None
    preemptions: int
    recomputed_tokens: int


class Backend(Protocol):
    """A scheduler plus an executor behind a clock (virtual or wall)."""

    vocab_size: int
    policy: str
    scheduler: Any  # its ``tool_calls`` index: a tool-calling client's lifecycle

    def now(self) -> float: ...
    def submit(
        self, rid: str, prompt: list[int], max_tokens: int, metadata: dict | LifecycleTicket | None
    ) -> None: ...
    def event(self, body: dict[str, Any]) -> str: ...
    def busy(self) -> bool: ...
    def step(self) -> tuple[list[Completion], bool]:
        """One engine iteration: (finished calls, whether anything was executed)."""
        ...

    def wait_until(self, t: float) -> None: ...
    def tokenize(self, text: str) -> list[int]: ...


# ---- the run --------------------------------------------------------------------------------
@dataclass
class CallRecord:
    """One LLM call as the client saw it."""

    app_id: str
    node_id: str
    submitted_s: float
    finished_s: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    after_tool: bool = False  # some predecessor's tool returned right before this call
    critical: bool = False
    preemptions: int = 0
    recomputed_tokens: int = 0
    tool_s: float = 0.0  # the actual tool duration that followed this call
    traffic: str = "agent"  # or bench.mixed's "chat-plain" / "chat-annotated"


@dataclass
class AppRecord:
    app_id: str
    arrival_s: float  # scheduled arrival, relative to the run start
    finished_s: float = math.nan

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.arrival_s


@dataclass
class RunResult:
    """Everything one policy's run produced (times relative to the run start)."""

    policy: str
    apps: list[AppRecord]
    calls: list[CallRecord]
    outputs: dict[str, list[int]]  # request id -> generated tokens (determinism checks)
    events: dict[str, int] = field(default_factory=dict)  # disposition -> count
    wall_s: float = 0.0


@dataclass
class _AppState:
    app: Application
    start: float = 0.0  # backend clock at arrival
    context: dict[str, list[int]] = field(default_factory=dict)  # handed-on contexts
    remaining: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    after_tool: set[str] = field(default_factory=set)  # nodes whose tool has returned
    call_ids: dict[str, str] = field(default_factory=dict)  # tool-calling: node -> its call id


class Driver:
    """Runs a workload on a backend; call :meth:`run` once.

    ``observe(backend, plan_or_none, now)`` is called after every step and before every idle
    wait (the metrics collector); ``on_progress(n)`` after every finished call.
    """

    def __init__(
        self,
        workload: Workload,
        backend: Backend,
        *,
        seed: int = 0,
        send_events: bool = True,
        tool_time_scale: float = 1.0,
        observe: Callable[[float], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        idle_quantum_s: float = 0.005,
        max_wall_s: float | None = None,
        client: str | None = None,
    ) -> None:
        self.wl = workload
        self.client = client  # None: each application's own ``client``
        self.be = backend
        self.seed = seed
        self.send_events = send_events
        self.tool_time_scale = tool_time_scale
        self.observe = observe
        self.on_progress = on_progress
        self.idle_quantum_s = idle_quantum_s
        self.max_wall_s = max_wall_s
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._pending: dict[str, tuple[_AppState, Node, CallRecord, list[int]]] = {}
        self.calls: list[CallRecord] = []
        self.outputs: dict[str, list[int]] = {}
        self.events: dict[str, int] = {}
        self._t0 = 0.0

    # ---- helpers ------------------------------------------------------------------------
    def _push(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._heap, (t, self._seq, kind, payload))
        self._seq += 1

    def _own_tokens(self, st: _AppState, node: Node) -> list[int]:
        if node.prompt_text is not None:
            return self.be.tokenize(node.prompt_text)
        if node.prompt_tokens:
            key = f"{self.seed}/{st.app.app_id}/{node.id}/prompt"
            return filler_tokens(node.prompt_tokens, key, self.be.vocab_size)
        return []

    def _tool_tokens(self, st: _AppState, node: Node) -> list[int]:
        tool = node.tool
        assert tool is not None
        if tool.result_text is not None:
            return self.be.tokenize(tool.result_text)
        key = f"{self.seed}/{st.app.app_id}/{node.id}/tool"
        return filler_tokens(tool.result_tokens or 0, key, self.be.vocab_size)

    def tool_duration(self, app_id: str, node: Node) -> float:
        """True duration with the workload's multiplicative noise, seeded per (app, node) so
        every policy waits exactly as long on the same tool."""
        return self.tool_duration_of(self.seed, app_id, node, self.tool_time_scale)

    @staticmethod
    def tool_duration_of(seed: int, app_id: str, node: Node, scale: float = 1.0) -> float:
        """See :meth:`tool_duration`."""
        tool = node.tool
        assert tool is not None
        d = tool.true_duration_s * scale
        if tool.duration_noise > 0:
            key = f"{seed}/{app_id}/{node.id}/noise"
            s = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
            d *= max(0.0, 1.0 + tool.duration_noise * float(np.random.default_rng(s).normal()))
        return d

    def _tool_calling(self, st: _AppState) -> bool:
        return (self.client or st.app.client) == "tool-calling"

    def _send(self, body: dict[str, Any], st: _AppState | None = None) -> None:
        if not self.send_events or (st is not None and self._tool_calling(st)):
            return
        disp = self.be.event(body)
        self.events[disp] = self.events.get(disp, 0) + 1

    # ---- DAG progress ------------------------------------------------------------------------
    def _arrive(self, st: _AppState, now: float) -> None:
        st.start = now
        st.remaining = set(st.app.node_ids)
        for nid in st.app.topological_order():
            node = st.app.node(nid)
            if not node.deps:
                self._ready(st, node, now)

    def _ready(self, st: _AppState, node: Node, now: float) -> None:
        """All predecessors have handed on their context: run (or complete) ``node``."""
        ctx = compose([st.context[d] for d in node.deps], self._own_tokens(st, node))
        if not node.is_llm:
            self._complete(st, node, ctx, now)
            return
        rid = f"{st.app.app_id}/{node.id}"
        md = node_metadata(st.app, node, rid)
        md["application_started_at_s"] = st.start
        md["application_start_offset_s"] = st.app.arrival_s
        md["application_elapsed_s"] = max(0.0, now - st.start)
        traffic = str(st.app.metadata.get("traffic", "agent"))
        rec = CallRecord(
            st.app.app_id, node.id, now - self._t0, prompt_tokens=len(ctx),
            after_tool=any(d in st.after_tool for d in node.deps),
            critical=bool(md.get("critical_path")), traffic=traffic,
        )  # fmt: skip
        self.calls.append(rec)
        self._pending[rid] = (st, node, rec, ctx)
        if not self._tool_calling(st):
            # An ordinary client (bench.mixed's plain chat) sends no metadata at all.
            self.be.submit(rid, ctx, node.max_tokens, None if traffic == "chat-plain" else md)
            return
        # The request carries its predecessors' tool results: their tool calls have returned.
        index = self.be.scheduler.tool_calls
        handles = [index.resume([st.call_ids.pop(d)]) for d in node.deps if d in st.call_ids]
        handle = next((h for h in handles if h), rid)
        hints = index.hints(handle, system_prompt_identity(node.agent_type))
        self.be.submit(rid, ctx, node.max_tokens, LifecycleTicket(handle, hints, hints))

    def _generated(self, c: Completion, now: float) -> None:
        st, node, rec, prompt = self._pending.pop(c.request_id)
        rec.finished_s = now - self._t0
        rec.output_tokens = len(c.output_ids)
        rec.cached_tokens = c.cached_tokens
        rec.ttft_s = c.ttft_s
        rec.preemptions = c.preemptions
        rec.recomputed_tokens = c.recomputed_tokens
        self.outputs[c.request_id] = list(c.output_ids)
        tool_calling = self._tool_calling(st)
        if node.tool is None:
            if tool_calling:  # a plain answer: the inferred lifecycle has nothing to wait for
                self.be.scheduler.tool_calls.close(c.request_id)
            self._complete(st, node, prompt + list(c.output_ids), now)
            return
        tool = node.tool
        if tool_calling:  # the response ends in one call of the tool's kind
            st.call_ids[node.id] = f"call-{c.request_id}"
            self.be.scheduler.tool_calls.enter(c.request_id, [(st.call_ids[node.id], tool.kind)])
        start: dict[str, Any] = {
            "event": "stall_started",
            "lifecycle_id": c.request_id,
            "kind": tool.kind,
        }
        if tool.estimate_s is not None and tool.estimate_s * self.tool_time_scale > 0:
            start["estimated_duration_s"] = tool.estimate_s * self.tool_time_scale
        self._send(start, st)
        dur = self.tool_duration(st.app.app_id, node)
        rec.tool_s = dur
        ctx = prompt + (list(c.output_ids) if tool.preserve_generation else [])
        ctx += self._tool_tokens(st, node)
        self._push(now + dur, "tool", (st, node, ctx, c.request_id))

    def _complete(self, st: _AppState, node: Node, ctx: list[int], now: float) -> None:
        st.context[node.id] = ctx
        st.done.add(node.id)
        st.remaining.discard(node.id)
        for s in st.app.successors(node.id):
            if all(d in st.done for d in st.app.node(s).deps):
                self._ready(st, st.app.node(s), now)
        if not st.remaining:
            st.context.clear()  # free the memory of finished applications
            self._finished_apps[st.app.app_id].finished_s = now - self._t0

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        be = self.be
        wall0 = time.monotonic()
        self._t0 = be.now()
        states = {a.app_id: _AppState(a) for a in self.wl.applications}
        self._finished_apps = {
            a.app_id: AppRecord(a.app_id, a.arrival_s) for a in self.wl.applications
        }
        for a in self.wl.applications:
            self._push(self._t0 + a.arrival_s, "arrive", states[a.app_id])
        left = len(states)
        while True:
            now = be.now()
            while self._heap and self._heap[0][0] <= now:
                _, _, kind, payload = heapq.heappop(self._heap)
                if kind == "arrive":
                    self._arrive(payload, now)
                else:
                    st, node, ctx, rid = payload
                    self._send({"event": "stall_finished", "lifecycle_id": rid}, st)
                    st.after_tool.add(node.id)
                    self._complete(st, node, ctx, now)
            left = sum(1 for r in self._finished_apps.values() if math.isnan(r.finished_s))
            if left == 0 and not be.busy():
                break
            if self.max_wall_s is not None and time.monotonic() - wall0 > self.max_wall_s:
                raise TimeoutError(f"run exceeded {self.max_wall_s} s of wall time")
            worked = False
            if be.busy():
                finished, worked = be.step()
                now = be.now()
                for c in finished:
                    self._generated(c, now)
                    if self.on_progress is not None:
                        self.on_progress(1)
                if self.observe is not None:
                    self.observe(now)
            if not worked:
                nxt = self._heap[0][0] if self._heap else None
                if nxt is None and not be.busy():
                    raise RuntimeError(
                        f"deadlock: {left} applications unfinished, nothing scheduled or running"
                    )
                target = now + self.idle_quantum_s if be.busy() else nxt
                if nxt is not None:
                    target = min(target, nxt)
                if self.observe is not None:
                    self.observe(now)
                be.wait_until(target)
        return RunResult(
            be.policy,
            list(self._finished_apps.values()),
            self.calls,
            self.outputs,
            dict(self.events),
            time.monotonic() - wall0,
        )


def running_blocks(scheduler: Any) -> int:
    """Distinct device blocks owned by the scheduler's running (admitted) requests."""
    held: set[int] = set()
    for r in scheduler.running:
        held.update(r.block_ids)
    return len(held)


def read_blocks(plan: StepPlan, block_size: int) -> int:
    """Distinct device blocks a step reads: for every chunk, its request's blocks up to the
    chunk's end (a request that computes attends its whole context so far)."""
    read: set[int] = set()
    for ch in plan.chunks:
        read.update(ch.request.block_ids[: -(-(ch.start + ch.num_tokens) // block_size)])
    return len(read)


def plan_snapshot(scheduler: Any, plan: StepPlan) -> tuple[int, int]:
    """(blocks held by running requests, blocks read by the plan), taken when it is planned."""
    return running_blocks(scheduler), read_blocks(plan, scheduler.pool.block_size)


# ---- simulator backend ------------------------------------------------------------------
class SimBackend:
    """The scheduler core and a policy on a virtual clock, with a preset's step costs.

    The executor is :class:`bench.presets.PresetExecutor`; copies report completion within the
    step that issued them (their time is charged by the preset).
    """

    def __init__(self, policy: str, preset: Any, *, vocab_size: int = 32000) -> None:
        from tokencake.memory.block_pool import BlockPool
        from tokencake.memory.host_pool import HostBlockPool
        from tokencake.scheduler.core import Scheduler, StepLoop
        from tokencake.scheduler.sim_executor import SimClock

        self.policy = policy
        self.preset = preset
        self.vocab_size = vocab_size
        # A real clock (time.monotonic) never reads 0, and 0 in application_started_at_s means
        # "not given": started at 0, the first application would carry no start time and lose
        # its application-level priority (program-level FCFS, app age, join inheritance).
        self.clock = SimClock(start=SIM_EPOCH_S)
        self.pool = BlockPool(preset.num_blocks + 1, preset.block_size)  # +1: the dummy page
        host = HostBlockPool(preset.host_blocks, preset.block_size) if preset.host_blocks else None
        self.cost_model = preset.cost_model()
        self.scheduler = Scheduler(preset.scheduler_config(), self.pool, policy, self.clock, host,
                                   cost_model=self.cost_model)  # fmt: skip
        self.executor = preset.executor(self.clock, self.cost_model, vocab_size)
        self.loop = StepLoop(self.scheduler, self.executor)
        self.last_plan: StepPlan | None = None
        self.plan_running_blocks: tuple[float, int, int] | None = None  # t, held, read

    def now(self) -> float:
        return self.clock()

    def tokenize(self, text: str) -> list[int]:
        return hashed_text_tokens(text, self.vocab_size)

    def submit(
        self, rid: str, prompt: list[int], max_tokens: int, metadata: dict | LifecycleTicket | None
    ) -> None:
        from tokencake.scheduler.request import Request

        self.scheduler.add_request(
            Request(rid, prompt, max_tokens, self.clock(), metadata=_metadata(metadata))
        )

    def event(self, body: dict[str, Any]) -> str:
        disp, _ = self.scheduler.lifecycle_event(body)
        return disp.value

    def busy(self) -> bool:
        return self.scheduler.has_work or self.scheduler.copies.in_flight > 0

    def step(self) -> tuple[list[Completion], bool]:
        t_plan = self.clock()
        plan = self.loop.plan()
        self.last_plan = plan
        self.plan_running_blocks = (t_plan, *plan_snapshot(self.scheduler, plan))
        if plan.empty:
            return [], False  # nothing to run: no step time passes (the driver waits instead)
        produced = self.loop.update(plan, self.loop.execute(plan))
        return [_completion(req) for req in produced if req.status.finished], True

    def wait_until(self, t: float) -> None:
        if t > self.clock():
            self.clock.advance(t - self.clock())


def _metadata(
    metadata: dict | LifecycleTicket | None,
) -> AgentMetadata | LifecycleTicket | None:
    """Wire metadata as the scheduler takes it (a ticket: an inferred lifecycle; None: an
    ordinary request)."""
    if metadata is None or isinstance(metadata, LifecycleTicket):
        return metadata
    return AgentMetadata.from_dict(metadata)


def _completion(req: Any) -> Completion:
    ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
    return Completion(
        req.request_id, list(req.output_token_ids), req.num_prompt_tokens,
        req.num_cached_tokens, ttft, req.num_preemptions, req.num_recomputed_tokens,
    )  # fmt: skip


# ---- real engine backend --------------------------------------------------------------------
class EngineBackend:
    """The real in-process engine on the wall clock (greedy, ``ignore_eos``: exact lengths)."""

    def __init__(self, engine: Any, policy: str) -> None:
        self.engine = engine
        self.policy = policy
        self.scheduler = engine.scheduler
        self.pool = engine.pool
        self.vocab_size = engine.model_config.vocab_size
        self.cost_model = engine.cost_model
        self.last_plan: StepPlan | None = None
        self.plan_running_blocks: tuple[float, int, int] | None = None  # t, held, read
        self.step_model: Any = None  # a preset StepModel: compare real steps with it
        self.step_wall_s = 0.0
        self.step_pred_s = 0.0
        self._reqs: dict[str, Any] = {}

    def now(self) -> float:
        return time.monotonic()

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text)

    def submit(
        self, rid: str, prompt: list[int], max_tokens: int, metadata: dict | LifecycleTicket | None
    ) -> None:
        from tokencake.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(prompt, params, rid, _metadata(metadata))
        self._reqs[rid] = self.scheduler.requests[rid]

    def event(self, body: dict[str, Any]) -> str:
        disp, _ = self.engine.lifecycle_event(body)
        return disp.value

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> tuple[list[Completion], bool]:
        t0 = time.monotonic()
        plan = self.engine.plan_step()  # the metrics collector reads the plan as planned
        self.last_plan = plan
        self.plan_running_blocks = (t0, *plan_snapshot(self.scheduler, plan))
        outs = self.engine.run_step(plan)
        worked = not plan.empty
        if worked and self.step_model is not None:
            # measured step wall time vs the calibrated model's prediction for the same plan
            self.step_wall_s += time.monotonic() - t0
            self.step_pred_s += self.step_model.step_time(plan)
        done = []
        for o in outs:
            if o.finished:
                req = self._reqs.pop(o.request_id)
                done.append(_completion(req))
        return done, worked

    def wait_until(self, t: float) -> None:
        dt = t - time.monotonic()
        if dt > 0:
            time.sleep(dt)
