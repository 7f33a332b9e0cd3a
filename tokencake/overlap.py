"""Overlap scheduling: the engine plans and dispatches step N+1 while step N runs on the device.

The synchronous loop (``LLMEngine._run``) leaves the device idle while the host reads step N's
tokens, updates the scheduler, detokenizes, checks stops and plans step N+1. With
``EngineConfig(overlap=True)`` one :meth:`OverlapLoop.run` call instead

1. takes the plan of step N+1, made while N was still in flight: :meth:`Scheduler.advance`
   gave every row of N that samples a :data:`~tokencake.scheduler.request.PENDING_TOKEN`,
   so N+1 already has its decode row and its next KV block (allocated ahead);
2. dispatches N+1; a row whose last token is pending reads it on the device from N's token
   buffer (:class:`~tokencake.runner.TokenFeed`, an input of the one compiled step, so no
   shape is added to warm-up);
3. reads N's tokens (``jax.device_get``; N+1 is queued behind N) and postprocesses N
   (:meth:`Scheduler.resolve`, detokenization, stop strings, outputs) while N+1 runs;
4. advances the scheduler past N+1 and keeps it in flight for the next call.

So every call returns the outputs of the step before. A request that finished at N (stop
string, EOS, ``max_tokens``) had one extra row computed at N+1: its result is never read,
its KV was written into blocks it owned when N+1 was dispatched (device dataflow orders that
write before any later step's write to those blocks, so freeing them at N's postprocessing is
safe), and :meth:`Scheduler.finish` drops a placeholder left behind. A request known to end at
N (its ``max_tokens``) gets no row at N+1 at all.

**Synchronous fallback, per step:** when the plan of N+1 needs the host to know a token of N
first, N is read and postprocessed *before* N+1 is dispatched (and rows of requests that just
finished are dropped from N+1):

- a row with logit controls (penalties, logit bias, structured-output grammar) whose last
  token is pending: its adjustment arrays are built on the host from the generated tokens;
- a plan with KV copies (host tier, swap): copies are issued against settled pages;
- an empty plan (nothing to overlap with).

Everything else overlaps: prefill chunks, the prefill -> decode transition (the first decode
row reads the prefill's sampled token from the device), ``n > 1`` choices (later choices are
released one step later, when choice 0's first token is read), preemption (a preempted
request keeps its pending token and recomputes it), aborts and tool-call lifecycles (they act
when the token is read, one step later). Greedy outputs equal the synchronous loop's (tests
hold this); sampled ones too, as a row's random key folds in its output count, which the
placeholder keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokencake.outputs import RequestOutput
from tokencake.runner import StepHandle
from tokencake.scheduler.plan import StepPlan
from tokencake.scheduler.request import Request

if TYPE_CHECKING:
    from tokencake.engine import LLMEngine


@dataclass
class InFlight:
    """A dispatched step whose tokens have not been read: its plan, the runner's handle and
    the requests :meth:`Scheduler.advance` gave a pending token."""

    plan: StepPlan
    handle: StepHandle
    pending: list[Request]


class OverlapLoop:
    """The engine's step with scheduling overlapped with compute (one step in flight)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.in_flight: InFlight | None = None
        self.sync_steps = 0  # steps that fell back to synchronous (see the module docstring)
        self.overlapped_steps = 0  # steps dispatched while the one before was in flight

    def run(self, plan: StepPlan) -> list[RequestOutput]:
        """Dispatch ``plan`` (planned while the previous step ran), then postprocess the
        previous step; returns the previous step's outputs."""
        e = self.engine
        outputs = e._fault_outputs()
        prev, self.in_flight = self.in_flight, None
        if prev is not None and self._needs_host(plan):
            self.sync_steps += 1
            outputs += self._collect(prev)
            prev = None
            plan.chunks = [c for c in plan.chunks if not c.request.status.finished]
        self.overlapped_steps += prev is not None
        try:
            handle = e.executor.dispatch(plan, prev.handle if prev else None, feed=True)
        except Exception as exc:
            handle = None
            outputs += e._fail_step(plan, exc)
        e.loop.report_copies()
        if prev is not None:
            outputs += self._collect(prev)
        if handle is not None:
            self.in_flight = InFlight(plan, handle, e.scheduler.advance(plan))
        return outputs + e._fault_outputs()

    @property
    def live(self) -> bool:
        """Whether the step in flight still has a request to report on. One whose requests
        all finished meanwhile (aborted) has nothing left to say: the engine counts as idle."""
        step = self.in_flight
        return step is not None and any(not c.request.status.finished for c in step.plan.chunks)

    def settle(self) -> None:
        """Read the step in flight now, if no request in it is live (waits for the device).
        Its outputs are empty: :meth:`Scheduler.resolve` skips finished requests."""
        if self.in_flight is not None and not self.live:
            prev, self.in_flight = self.in_flight, None
            self._collect(prev)

    def _needs_host(self, plan: StepPlan) -> bool:
        """Whether ``plan`` must wait for the step in flight to be read (module docstring)."""
        if plan.copies or not plan.chunks:
            return True
        text = self.engine._text
        for c in plan.chunks:
            req = c.request
            if req.num_pending:
                state = text.get(req.request_id)
                if state is not None and state.controls is not None:
                    return True
        return False

    def _collect(self, step: InFlight) -> list[RequestOutput]:
        """Read ``step``'s tokens, fill them in and postprocess (detokenize, stop, output)."""
        e = self.engine
        try:
            samples = e.executor.collect(step.handle)
        except Exception as exc:
            return e._fail_step(step.plan, exc)
        tokens = {rid: s.token for rid, s in samples.items()}
        produced = e.scheduler.resolve(step.pending, tokens)
        return e._outputs(produced, samples)
