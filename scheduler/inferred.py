"""Tool-call lifecycles inferred from the OpenAI tool-calling protocol (issue 14).

A client that sends no hints and posts no events still tells the server when its agent enters
and leaves a tool call: a response that ends in ``tool_calls`` starts the call, and a later
request whose messages carry the matching ``tool`` results (by ``tool_call_id``) is the return.
This module turns those two facts into the same lifecycle transitions the explicit events make
(DESIGN.md rule 10), so the Time Scheduler keeps / offloads / drops the conversation's KV during
the tool exactly as it does for annotated agents, and the return is a prefix hit.

* :class:`LifecycleTicket` is what the server hands the scheduler with a request that opens a
  lifecycle: the metadata the lifecycle record uses (agent identity, preservable), the hints the
  Space Scheduler sees (``None`` for an unannotated request: it stays an ordinary request for
  ordering, reservations and victims) and the client-visible handle.
* :func:`open_lifecycle` opens a new request's lifecycle, from a ticket or from the agent
  metadata the request carries (validated first).
* :class:`ToolCallIndex` maps each pending ``tool_call_id`` to the record that made it, bounded
  by count and bytes (ids are server-made, but every pending call costs memory until its
  conversation returns or expires); a record's ids go when it ends. It also remembers when each
  conversation started and how many calls it made (same bounds), the program-level facts the
  Space Scheduler's score ages by (:meth:`ToolCallIndex.hints`).

Everything here runs on the engine thread, like every lifecycle call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokencake.scheduler.bounded import ByteLRU
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.lifecycle import Lifecycle, LifecycleRecord, LifecycleState
from tokencake.scheduler.limits import MAX_NAME_CHARS
from tokencake.scheduler.metadata import AgentMetadata, coerce_metadata
from tokencake.scheduler.request import Request

MAX_CALLS_PER_RESPONSE = 128  # parallel calls indexed per response (the rest cannot be matched)


@dataclass(frozen=True)
class LifecycleTicket:
    """Opens a lifecycle for one request (passed as the request's ``metadata``).

    ``record`` is the lifecycle record's metadata (identity for the duration predictor,
    ``offload_eligible``/``reusable_prefix`` for the Time Scheduler); ``hints`` is what the
    request itself carries for the Space Scheduler (``None``: unannotated); ``handle`` is the
    conversation's client-visible lifecycle id; ``inferred`` marks a lifecycle opened only
    because the request offers tools (no hints): it ends at once when the response makes no
    call."""

    handle: str
    record: AgentMetadata
    hints: AgentMetadata | None = None
    inferred: bool = True


def open_lifecycle(lifecycle: Lifecycle, request: Request) -> None:
    """Validate ``request``'s agent metadata (:class:`RequestRejected` naming the field) and
    open its lifecycle. A :class:`LifecycleTicket` opens one for the record's metadata under
    its handle and leaves the request only its hints (``None``: an ordinary request to the
    policies)."""
    if isinstance(request.metadata, LifecycleTicket):
        t = request.metadata
        request.metadata = coerce_metadata(t.hints)
        lifecycle.associate(request.request_id, t.record, handle=t.handle)
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
    lifecycle.associate(request.request_id, m)


def call_kind(names: Sequence[str]) -> str:
    """The stall's kind: the function name, or the sorted distinct names of parallel calls
    joined by ``+`` (the stall lasts as long as the slowest; a combination is its own kind)."""
    kind = "+".join(sorted(set(names))) or "stall"
    return kind[:MAX_NAME_CHARS]


class ToolCallIndex:
    """Pending tool calls -> the lifecycle record that made them; starts and ends stalls."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        max_entries: int = 65536,
        max_bytes: int = 64 * 2**20,
    ) -> None:
        self.lifecycle = lifecycle
        # Idle entries also expire after the longest stall a lifecycle may have.
        self.calls: ByteLRU[str, str] = ByteLRU(
            max_bytes, lifecycle.config.safety_max_s, max_entries=max_entries
        )
        # conversation handle -> (its first call's arrival, calls so far)
        self.conversations: ByteLRU[str, tuple[float, int]] = ByteLRU(
            max_bytes, lifecycle.config.safety_max_s, max_entries=max_entries
        )
        self.counters: dict[str, int] = {}
        lifecycle.listeners.append(self._on_lifecycle)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _on_lifecycle(self, rec: LifecycleRecord, transition: str) -> None:
        if rec.terminal:  # its calls can no longer be answered into this record
            for cid in rec.call_ids:
                if self.calls.peek(cid) == rec.lifecycle_id:
                    self.calls.pop(cid)

    def enter(self, key: str, calls: Sequence[tuple[str, str]]) -> bool:
        """The response of record ``key`` ended in ``calls`` (``(tool_call_id, function
        name)``): the conversation enters a tool call. The stall starts now (unless an explicit
        ``stall_started`` already did: events win) and the call ids are indexed for the return.
        Returns whether the record was live."""
        lc = self.lifecycle
        lc.expire()
        rec = lc.records.get(key)
        if rec is None or rec.terminal or not calls:
            return False
        now = lc.clock()
        self.calls.expire(now)
        calls = list(calls)[:MAX_CALLS_PER_RESPONSE]
        rec.call_ids = tuple(cid for cid, _ in calls)
        for cid, _ in calls:
            self.calls.put(cid, key, now)
        self._count("inferred_calls")
        if rec.started_at is None:
            lc.stall_started(key, call_kind([name for _, name in calls]), None, source="inferred")
        return True

    def resume(self, result_ids: Sequence[str]) -> str | None:
        """A request carries ``tool`` results for ``result_ids``: if they answer calls we
        indexed, that conversation's tool call has returned; its stall finishes now (before the
        request is queued, so a due upload starts at once and the request finds its KV).
        Returns the conversation's handle (``None``: no known call)."""
        lc = self.lifecycle
        lc.expire()
        now = lc.clock()
        for cid in result_ids:
            key = self.calls.get(cid, now)
            rec = lc.records.get(key) if key is not None else None
            if rec is None:
                continue
            if not rec.terminal and rec.state is not LifecycleState.GENERATING:
                lc.supersede(rec)
                self._count("inferred_returns")
            return rec.handle or rec.lifecycle_id
        if result_ids:
            self._count("unmatched_returns")
        return None

    def hints(self, handle: str, identity: str) -> AgentMetadata:
        """What the protocol tells the Space Scheduler about the next call of conversation
        ``handle`` by agent ``identity`` (no client hints): the identity stands for the agent
        type (agents of one kind share instructions, hence a system prompt), the conversation's
        start for the application's (its calls age together, program-level), the call count
        for the depth; the KV may be kept (the conversation goes on after a tool)."""
        now = self.lifecycle.clock()
        start, calls = self.conversations.get(handle, now) or (now, 0)
        self.conversations.put(handle, (start, calls + 1), now)
        return AgentMetadata(
            agent_type=identity,
            agent_name=identity,
            application_started_at_s=max(0.0, start),
            depth=min(calls + 1, 1000),
            offload_eligible=True,
            reusable_prefix=True,
        )

    def close(self, key: str) -> None:
        """The response of an inferred lifecycle made no tool call: nothing to wait for."""
        rec = self.lifecycle.records.get(key)
        if rec is not None and rec.started_at is None:
            self.lifecycle.end(key, "no_tool_call")

    def __len__(self) -> int:
        return len(self.calls)
