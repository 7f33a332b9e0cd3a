"""Asyncio front of the engine: one thread owns the engine (and so every JAX call); coroutines
submit requests and stream deltas back through per-request asyncio queues.

What the server and the app runtime need from the engine is a named method here (``tokenize``,
``tokenize_chat``, ``token_texts``, ``kv_stats``, ``lifecycle_event``, ``alive``, ``info``), so
no caller builds closures over the engine's pool, queues or tokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tokencake.engine import LLMEngine
from tokencake.errors import EngineDeadError
from tokencake.outputs import KVStats, RequestOutput
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.lifecycle import Disposition, LifecycleEvent
from tokencake.toolcall.request import ToolRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """Facts about the served model that never change while serving."""

    model_name: str
    max_model_len: int
    max_seq_tokens: int  # the most tokens one sequence can ever hold in KV
    vocab_size: int
    # temperature / top_p / top_k the model's files recommend (ModelConfig.sampling_defaults)
    sampling_defaults: Mapping[str, float | int] = field(default_factory=dict)
    chat_template: str | None = None  # the tokenizer's Jinja template (None: the fallback)


LifecycleHandler = Callable[[Any], tuple[Any, dict[str, Any]]]


def lifecycle_handler(engine: Any) -> LifecycleHandler | None:
    """The engine's lifecycle-event entry point (on the engine, else on its scheduler)."""
    fn = getattr(engine, "lifecycle_event", None)
    if fn is None:
        fn = getattr(getattr(engine, "scheduler", None), "lifecycle_event", None)
    return fn


class AsyncEngine:
    """Runs :class:`LLMEngine` on a background thread and exposes ``stream()``."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        pool = engine.pool
        # Read before the engine thread starts: afterwards only that thread touches the engine.
        self.info = EngineInfo(
            model_name=engine.model_name,
            max_model_len=engine.max_model_len,
            max_seq_tokens=min(engine.max_model_len, pool.capacity * pool.block_size),
            vocab_size=engine.model_config.vocab_size,
            sampling_defaults=dict(engine.model_config.sampling_defaults),
            chat_template=engine.tokenizer.chat_template,
        )
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.error: BaseException | None = None
        # Request text is tokenized on this worker, with its own tokenizer copy (see tokenize).
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokencake-tokenize")
        self._request_tokenizer: Any = None
        self.max_prompt_chars = self.info.max_seq_tokens * engine.tokenizer.max_token_chars
        self._thread = threading.Thread(target=self._loop, name="tokencake-engine", daemon=True)
        self._thread.start()

    # ---- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    # Idle, but the Time Scheduler may have an upload or a TTL due while every
                    # agent waits on a tool: step (schedule only, no compute) when it is.
                    due = self.engine.seconds_until_timer()
                    if due > 0:
                        self._wake.wait(min(0.05, due))
                        self._wake.clear()
                        continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    # The engine isolates faults per request (a request's bad data aborts that
                    # request, a failed device step its rows); what still escapes is a fault no
                    # request explains. Fail the requests in flight (abort frees their blocks)
                    # and keep serving new ones rather than take the server down.
                    log.exception("engine step failed; aborting in-flight requests")
                    self._fail_all(exc)
                    continue
                # A distributed run that lost a process stops for good (engine.failure): its
                # requests end as "engine not running" (503), and so does this loop.
                failure = getattr(self.engine, "failure", None)
                for out in outputs:
                    err = out.error
                    if err is not None and err is failure:
                        err = EngineDeadError(str(failure))
                    self._deliver(out.request_id, out if err is None else err)
                if failure is not None:
                    raise failure
        except BaseException as exc:  # the thread must report, not vanish
            log.exception("engine loop crashed")
            self.error = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine stopped: {exc!r}"))

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self._streams):
            self.engine.abort_request(rid)
            self._deliver(
                rid, RuntimeError(f"internal error while generating: {type(exc).__name__}")
            )

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            cmd()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        if isinstance(item, BaseException) or item.request_finished:
            self._streams.pop(request_id, None)
        with contextlib.suppress(RuntimeError):  # loop closed: the consumer is gone
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _submit(self, fn: Callable[[], Any]) -> None:
        if self.error is not None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        self._commands.put(fn)
        self._wake.set()

    # ---- public API --------------------------------------------------------------------------
    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        metadata: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a :class:`RequestOutput` per new token; the last one has ``finished=True``
        (with ``n > 1``: outputs of every choice, told apart by ``index``; the stream ends
        after the output with ``request_finished``).

        Bad input raises ValueError/TypeError before anything is queued. Leaving the loop early
        (or the task being cancelled) aborts the request and frees its blocks. A text prompt
        is tokenized off the engine thread first (:meth:`tokenize`).
        """
        if isinstance(prompt, str):
            prompt = await self.tokenize(prompt)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = loop.create_future()

        def add() -> None:
            try:
                rid = self.engine.add_request(prompt, params, request_id, metadata)
                self._streams[rid] = (loop, q)
                loop.call_soon_threadsafe(_set_result, done, rid)
            except BaseException as exc:
                loop.call_soon_threadsafe(_set_exception, done, exc)

        self._submit(add)
        try:
            rid = await asyncio.shield(done)
        except asyncio.CancelledError:
            # Cancelled while the add was in flight: abort the request once it has an id.
            def abort_later(fut: asyncio.Future) -> None:
                if not fut.cancelled() and fut.exception() is None:
                    rid = fut.result()
                    self._streams.pop(rid, None)
                    with contextlib.suppress(EngineDeadError):
                        self._submit(lambda: self.engine.abort_request(rid))

            done.add_done_callback(abort_later)
            raise
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.request_finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._streams.pop(rid, None)
                with contextlib.suppress(EngineDeadError):
                    self._submit(lambda: self.engine.abort_request(rid))

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, **kw: Any
    ) -> RequestOutput:
        """Run one request to completion and return its final output."""
        last = None
        async for out in self.stream(prompt, params, **kw):
            last = out
        assert last is not None
        return last

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread (for state reads and lifecycle events)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run() -> None:
            try:
                res = fn(self.engine)
                loop.call_soon_threadsafe(_set_result, fut, res)
            except BaseException as exc:
                loop.call_soon_threadsafe(_set_exception, fut, exc)

        self._submit(run)
        return await fut

    # ---- named engine calls -----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the engine thread is serving (False once it crashed or was shut down)."""
        return self.error is None and self._thread.is_alive()

    async def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text, or ids checked against the vocabulary); bad input
        raises ``RequestRejected`` on ``prompt``.

        Client-sized work stays off the engine thread (issue 15, finding 5): a text longer
        than could ever fit the context (``max_prompt_chars``) is refused before tokenizing,
        and the rest is tokenized on a worker thread with its own tokenizer copy (the
        engine's detokenizer never waits on its lock; the fast tokenizer releases the GIL)."""
        if isinstance(prompt, str):
            self._check_chars("prompt", len(prompt))
        return await self._off_engine(lambda tok: self.engine.tokenize(prompt, tok))

    async def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tool_request: ToolRequest | None = None,
    ) -> list[int]:
        """Token ids of a conversation under the model's chat template; ``tool_request`` adds
        tools, calls and results (see :meth:`LLMEngine.tokenize_chat`). On a worker thread, as
        :meth:`tokenize`; the text of the messages is bounded the same way first."""
        self._check_chars("messages", _text_chars(messages))
        return await self._off_engine(
            lambda tok: self.engine.tokenize_chat(
                messages, add_generation_prompt, tool_request, tok
            )
        )

    def _check_chars(self, param: str, n: int) -> None:
        if n > self.max_prompt_chars:
            raise RequestRejected(
                param,
                f"the {param} has {n} characters; at most {self.max_prompt_chars} can fit the "
                f"{self.info.max_seq_tokens}-token context",
            )

    async def _off_engine(self, fn: Callable[[Any], list[int]]) -> list[int]:
        def run() -> list[int]:
            if self._request_tokenizer is None:  # only ever touched on the worker thread
                self._request_tokenizer = self.engine.tokenizer.clone()
            return fn(self._request_tokenizer)

        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, run)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """The text of each token on its own (logprob entries). Callable from any thread: the
        tokenizer guards itself with a lock, and a decode is far cheaper than a hop to the
        engine thread, which only runs commands between steps."""
        decode = self.engine.tokenizer.decode
        return [decode([int(t)]) for t in token_ids]

    async def kv_stats(self) -> KVStats:
        """Device KV blocks and queue lengths, read on the engine thread."""
        return await self.call(lambda e: e.kv_stats())

    async def lifecycle_event(
        self, event: LifecycleEvent | dict[str, Any]
    ) -> tuple[Disposition, dict[str, Any]]:
        """Apply a tool-lifecycle event on the engine thread: (disposition, body).
        An engine without lifecycle support answers ``UNAVAILABLE``."""

        def apply(engine: Any) -> tuple[Disposition, dict[str, Any]]:
            fn = lifecycle_handler(engine)
            if fn is None:
                return Disposition.UNAVAILABLE, {
                    "error": "lifecycle events are not supported by this engine"
                }
            disposition, body = fn(event)
            return Disposition(getattr(disposition, "value", disposition)), dict(body or {})

        return await self.call(apply)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():  # else the engine thread may still issue copies
            self.engine.close()


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _text_chars(messages: Any) -> int:
    """Characters of the text in chat messages (string contents and text parts): a lower
    bound on the rendered prompt's length."""
    n = 0
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            n += sum(len(p["text"]) for p in content
                     if isinstance(p, dict) and isinstance(p.get("text"), str))  # fmt: skip
    return n
