"""The tool-call lifecycle of each HTTP request: annotated, inferred, or both (issue 14).

Two sources, one model (DESIGN.md rule 10):

* **annotated**: the request carries ``tokencake`` metadata (hints); the client may post
  ``stall_started`` / ``stall_finished`` events;
* **inferred**: a chat request that offers tools opens a lifecycle with no hints at all; a
  response ending in ``tool_calls`` starts the stall (kind = the function name), and a later
  request whose trailing ``tool`` messages answer those ``tool_call_id``\\ s ends it.

Both may apply to one request (hints and tool calling): the record uses the hints, the protocol
supplies the start and end the client did not post. Explicit wins whenever both say something:
the client's ``agent_type`` / ``agent_name`` over the inferred identity, its ``lifecycle_id``
over the conversation's, its ``stall_started`` kind and estimate over the function name, and
whichever ``stall_finished`` comes first ends the stall.

Agent identity without hints: the request's ``user``, else a hash of its system prompt (agents
of one kind share their instructions); it keys the duration predictor (with the function name;
none -> the function name alone) and stands for the agent type, with the conversation's start
and call count, in the hints the Space Scheduler gets (``ToolCallIndex.hints``).

The lifecycle id (``tc-`` + UUID4 hex) is returned in the ``X-Tokencake-Lifecycle-Id`` header
and in the response's ``tokencake`` field; a conversation's return reuses the id of the call it
answers, so one conversation keeps one id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any

from tokencake.scheduler.inferred import LifecycleTicket
from tokencake.scheduler.limits import MAX_NAME_CHARS
from tokencake.server.protocol import GenerationRequest
from tokencake.server.state import State
from tokencake.toolcall import ToolCall

HEADER = "X-Tokencake-Lifecycle-Id"


def new_handle() -> str:
    """A fresh lifecycle id in the wire format (``tc-`` + lowercase UUID4 hex)."""
    return "tc-" + uuid.uuid4().hex


def agent_identity(p: GenerationRequest) -> str:
    """``user:<user>``, else ``system:<hash of the system prompt>``, else ``""``."""
    if p.user:
        return ("user:" + p.user)[:MAX_NAME_CHARS]
    for m in p.tool_request.messages if p.tool_request is not None else ():
        if m.role in ("system", "developer"):
            return "system:" + hashlib.sha256(m.content.encode()).hexdigest()[:16]
    return ""


def _tool_calling(p: GenerationRequest) -> bool:
    tr = p.tool_request
    return tr is not None and bool(tr.tools) and tr.choice.parses_calls


def _index(st: State) -> Any:
    """The scheduler's tool-call index, or None (an engine without one: nothing inferred)."""
    sched = getattr(getattr(st.engine, "engine", None), "scheduler", None)
    return getattr(sched, "tool_calls", None)


async def open_lifecycle(st: State, p: GenerationRequest) -> None:
    """Before the request is queued: end the stall its ``tool`` results answer (so the KV is
    resident or uploading when it is admitted), then give it the ticket that opens its own
    lifecycle, and the header / body field that name it."""
    tr = p.tool_request
    returning = tr.history.last_results if tr is not None else ()
    known_handle = None
    if returning and _index(st) is not None:
        known_handle = await st.engine.call(lambda e: e.scheduler.tool_calls.resume(returning))
    hints = p.metadata
    if hints is None and not (_tool_calling(p) and _index(st) is not None):
        return
    handle = p.lifecycle_handle or known_handle or new_handle()
    identity = agent_identity(p)
    if hints is None:  # inferred: identity, conversation start and turn from the protocol
        record = await st.engine.call(lambda e: e.scheduler.tool_calls.hints(handle, identity))
    elif not (hints.agent_type or hints.agent_name):
        record = dataclasses.replace(hints, agent_name=identity)
    else:
        record = hints
    # An inferred record is also what the policies see (the hints the protocol gave).
    p.ticket = LifecycleTicket(handle, record, hints or record, inferred=hints is None)
    source = "inferred" if hints is None else "annotated"
    p.response_headers[HEADER] = handle
    p.response_extra["tokencake"] = {"lifecycle_id": handle, "source": source}
    if _tool_calling(p):
        p.on_done = lambda calls: _after(st, p, calls)


async def _after(st: State, p: GenerationRequest, calls: list[ToolCall]) -> None:
    """The response is written (before its stream ends): a tool call starts the stall now;
    an inferred lifecycle whose response made no call ends."""
    ticket: LifecycleTicket = p.ticket
    key = p.request_id
    if calls:
        pairs = [(c.id, c.name) for c in calls]
        await st.engine.call(lambda e: e.scheduler.tool_calls.enter(key, pairs))
    elif ticket.inferred:
        await st.engine.call(lambda e: e.scheduler.tool_calls.close(key))


def calls_of(body: dict[str, Any]) -> list[ToolCall]:
    """The tool calls of a finished chat completion body."""
    out: list[ToolCall] = []
    for choice in body.get("choices", ()):
        for c in (choice.get("message") or {}).get("tool_calls") or ():
            out.append(ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]))
    return out
