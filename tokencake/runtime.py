"""The application runtime: runs many :class:`~tokencake.app.App` instances concurrently.

For every agent node the runtime composes the prompt (append-only), attaches the scheduling
metadata computed from the graph plus the per-run fields (a fresh ``lifecycle_id``, the
application's start time, offset and elapsed time), generates, and, when the agent has a tool,
brackets the real tool call with ``stall_started`` / ``stall_finished`` lifecycle events. As the
protocol asks (paper §8.2), each event is acknowledged before the tool starts and before any
successor is submitted.

Two targets share one interface: :class:`EngineTarget` (in process, over an
:class:`~tokencake.async_engine.AsyncEngine`) and :class:`HTTPTarget` (a remote Tokencake server,
metadata under ``vllm_xargs.tokencake``, events on ``/v1/tokencake/events``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokencake.app import DEFAULT_SECONDS_PER_TOKEN, App, GraphInfo, ToolCall, compose

log = logging.getLogger(__name__)


def new_lifecycle_id() -> str:
    """``"tc-"`` + a lowercase UUID4 hex: the wire format of request and lifecycle ids."""
    return "tc-" + uuid.uuid4().hex


@dataclass(frozen=True)
class Generation:
    """What a target returns for one LLM call."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None


class Target(Protocol):
    """Where agent calls go: generation plus lifecycle events."""

    async def generate(
        self,
        prompt: str,
        max_tokens: int,
        request_id: str,
        metadata: dict[str, Any],
        temperature: float,
    ) -> Generation: ...

    async def event(self, body: dict[str, Any]) -> str:
        """Send a lifecycle event; returns the disposition (``"unavailable"`` if unsupported)."""
        ...


class EngineTarget:
    """In-process target over an :class:`AsyncEngine` (metadata as ``AgentMetadata``)."""

    def __init__(self, async_engine: Any) -> None:
        self.engine = async_engine

    async def generate(
        self,
        prompt: str,
        max_tokens: int,
        request_id: str,
        metadata: dict[str, Any],
        temperature: float,
    ) -> Generation:
        from tokencake.sampling_params import SamplingParams
        from tokencake.scheduler.metadata import AgentMetadata

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        out = await self.engine.generate(
            prompt, params, request_id=request_id, metadata=AgentMetadata.from_dict(metadata)
        )
        return Generation(
            out.text,
            len(out.prompt_token_ids),
            len(out.token_ids),
            out.num_cached_tokens,
            out.finish_reason,
        )

    async def event(self, body: dict[str, Any]) -> str:
        disposition, _ = await self.engine.lifecycle_event(dict(body))
        return disposition.value


class HTTPTargetError(RuntimeError):
    """The server could not be reached or refused the client as a whole (a wrong or missing
    API key); the message says what to do, so a script can print it as its one line."""


class HTTPTarget:
    """A remote Tokencake (or OpenAI-compatible) server, via ``/v1/completions``.

    Use as an async context manager (it owns an ``aiohttp.ClientSession``). An unreachable
    server or a refused API key raises :class:`HTTPTargetError`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._session: Any = None

    async def __aenter__(self) -> HTTPTarget:
        import aiohttp

        self._session = aiohttp.ClientSession(
            headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def generate(
        self,
        prompt: str,
        max_tokens: int,
        request_id: str,
        metadata: dict[str, Any],
        temperature: float,
    ) -> Generation:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "request_id": request_id,
            "vllm_xargs": {"tokencake": metadata},  # what the authors' client sends
        }
        if self.model:
            body["model"] = self.model
        status, data = await self._post("/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"completion {request_id} failed with {status}: {data}")
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        choice = data["choices"][0]
        return Generation(
            choice["text"], usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
            details.get("cached_tokens", 0), choice.get("finish_reason"),
        )  # fmt: skip

    async def event(self, body: dict[str, Any]) -> str:
        status, data = await self._post("/v1/tokencake/events", body)
        if status == 400:
            raise ValueError(f"event refused: {data}")
        return str(data.get("disposition") or ("unavailable" if status == 503 else status))

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        import aiohttp

        url = self.base_url + path
        try:
            async with self._session.post(url, json=body) as resp:
                data = await resp.json(content_type=None)
                status = resp.status
        except aiohttp.ClientConnectionError as exc:
            raise HTTPTargetError(
                f"cannot reach {self.base_url} ({exc.__class__.__name__}); is `tokencake serve` "
                "running there?"
            ) from None
        if status == 401:
            how = "is wrong" if self.headers else "is missing"
            raise HTTPTargetError(
                f"{self.base_url} requires an API key and this one {how} (401): pass --api-key "
                "or set TOKENCAKE_API_KEY"
            )
        return status, data


@dataclass
class NodeResult:
    """One agent's run: its prompt, output, tool result, metadata sent, timings, events."""

    name: str
    prompt: str
    output: str
    tool_result: str | None
    metadata: dict[str, Any]
    generation: Generation
    submitted_at: float
    generated_at: float
    finished_at: float
    stage_times: dict[str, float] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # (event, disposition)

    @property
    def context(self) -> str:
        """What successors build on: prompt + output + tool result."""
        return self.prompt + self.output + (self.tool_result or "")


@dataclass
class AppResult:
    app: str
    nodes: dict[str, NodeResult]
    started_at: float
    finished_at: float
    graph: GraphInfo

    @property
    def elapsed_s(self) -> float:
        return self.finished_at - self.started_at


class Runtime:
    """Runs applications against a target; many may run at once on one event loop.

    ``seconds_per_token`` weighs LLM nodes on the critical path; ``send_events=False`` makes a
    scheduling-only client (no lifecycle events).
    """

    def __init__(
        self,
        target: Target,
        *,
        seconds_per_token: float = DEFAULT_SECONDS_PER_TOKEN,
        temperature: float = 0.0,
        send_events: bool = True,
        tool_separator: str = "\n[tool result]\n",
    ) -> None:
        self.target = target
        self.seconds_per_token = seconds_per_token
        self.temperature = temperature
        self.send_events = send_events
        self.tool_separator = tool_separator
        self._t0 = time.time()

    async def run(
        self, app: App, inputs: dict[str, str] | None = None, *, start_offset_s: float | None = None
    ) -> AppResult:
        """Run one application to completion; returns every node's result."""
        inputs = dict(inputs or {})
        graph = app.analyze(self.seconds_per_token)
        started = time.time()
        offset = start_offset_s if start_offset_s is not None else max(0.0, started - self._t0)
        done: dict[str, asyncio.Future[NodeResult]] = {
            n: asyncio.get_running_loop().create_future() for n in graph.order
        }

        async def node(name: str) -> None:
            try:
                preds = [await done[p] for p in app.preds[name]]
                done[name].set_result(
                    await self._run_node(app, graph, name, preds, inputs, started, offset)
                )
            except asyncio.CancelledError:
                # Cancelled (a sibling failed, or the loop is closing): a cancelled future, not
                # one holding an exception nobody reads (asyncio logs those with a traceback).
                done[name].cancel()
                raise
            except BaseException as exc:
                done[name].set_exception(exc)
                raise

        tasks = [asyncio.ensure_future(node(n)) for n in graph.order]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for f in done.values():  # a failed predecessor leaves successors' futures unread
                if f.done() and not f.cancelled():
                    f.exception()
        return AppResult(
            app.name, {n: done[n].result() for n in graph.order}, started, time.time(), graph
        )

    async def run_many(
        self, runs: Sequence[tuple[App, dict[str, str] | None]], arrival_gap_s: float = 0.0
    ) -> list[AppResult]:
        """Run applications concurrently; the i-th starts ``i * arrival_gap_s`` seconds in."""

        async def one(i: int, app: App, inputs: dict[str, str] | None) -> AppResult:
            await asyncio.sleep(i * arrival_gap_s)
            return await self.run(app, inputs, start_offset_s=i * arrival_gap_s)

        return list(await asyncio.gather(*(one(i, a, x) for i, (a, x) in enumerate(runs))))

    def metadata(
        self,
        graph: GraphInfo,
        app: App,
        name: str,
        lifecycle_id: str,
        started: float,
        offset: float,
    ) -> dict[str, Any]:
        """The wire metadata of one call: graph facts plus this run's ids and timing."""
        info = graph.nodes[name]
        return {
            "lifecycle_id": lifecycle_id,
            "agent_type": app.agents[name].agent_type,
            "agent_name": name,
            **info.as_dict(),
            "application_max_depth": graph.max_depth,
            "application_started_at_s": started,
            "application_start_offset_s": offset,
            "application_elapsed_s": max(0.0, time.time() - started),
            "memory_weight": app.agents[name].memory_weight,
        }

    async def _run_node(
        self,
        app: App,
        graph: GraphInfo,
        name: str,
        preds: list[NodeResult],
        inputs: dict[str, str],
        started: float,
        offset: float,
    ) -> NodeResult:
        agent = app.agents[name]
        prompt = compose(app.system_prompt, [p.context for p in preds], app.render(name, inputs))
        lifecycle_id = new_lifecycle_id()
        meta = self.metadata(graph, app, name, lifecycle_id, started, offset)
        submitted = time.monotonic()
        gen = await self.target.generate(
            prompt, agent.max_tokens, lifecycle_id, meta, self.temperature
        )
        generated = time.monotonic()
        result = NodeResult(
            name, prompt, gen.text, None, meta, gen, submitted, generated, generated
        )
        if agent.tool is None:
            return result
        tool = agent.tool
        if self.send_events:
            start_ev: dict[str, Any] = {
                "event": "stall_started",
                "lifecycle_id": lifecycle_id,
                "kind": tool.name,
            }
            if tool.predict_time is not None:
                start_ev["estimated_duration_s"] = tool.predict_time
            result.events.append(("stall_started", await self._event(start_ev)))
        call = ToolCall(name, prompt, gen.text, inputs)
        try:
            out = (
                tool.fn(call)
                if inspect.iscoroutinefunction(tool.fn)
                else await asyncio.to_thread(tool.fn, call)
            )
            if inspect.isawaitable(out):
                out = await out
        finally:
            if self.send_events:
                # Always close the stall, even if the tool failed, so the server stops holding KV.
                finish = {"event": "stall_finished", "lifecycle_id": lifecycle_id}
                result.events.append(("stall_finished", await self._event(finish)))
        result.tool_result = self.tool_separator + str(out)
        result.stage_times = dict(call.stage_times)
        result.finished_at = time.monotonic()
        return result

    async def _event(self, body: dict[str, Any]) -> str:
        disposition = await self.target.event(body)
        if disposition not in ("applied", "duplicate", "late_finish"):
            log.debug(
                "lifecycle event %s for %s: %s", body["event"], body["lifecycle_id"], disposition
            )
        return disposition
