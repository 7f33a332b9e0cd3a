"""A simulated executor with the real one's tiny interface, for tests and paper-scale runs.

``execute(plan)`` returns one deterministic fake token per sampling chunk (a hash of the
sequence so far, so outputs are identical under every policy, as a greedy model's would be)
and advances a simulated clock by a linear step cost; block copies cost what the cost model
says and complete within the step (reported through ``landed_copies``). The step itself is
the shared :class:`~tokencake.scheduler.core.StepLoop`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from tokencake.memory.cost_model import CostModel
from tokencake.scheduler.core import Scheduler, StepLoop
from tokencake.scheduler.plan import BlockCopy, StepPlan
from tokencake.scheduler.request import Request, RequestStatus


class SimClock:
    """A clock the simulation advances explicitly (callable, like ``time.monotonic``)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError("time cannot go backwards")
        self.t += dt


@dataclass(frozen=True)
class StepCost:
    """Step time = a + b*decode_rows + c*prefill_tokens + d*context_tokens (seconds)."""

    a: float = 5e-3
    b: float = 1e-4
    c: float = 5e-5
    d: float = 1e-7
    idle: float = 1e-3  # an empty step still lets time pass (tools keep running)

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d", "idle"):
            if getattr(self, name) < 0:
                raise ValueError(f"StepCost.{name} must be >= 0")


def fake_token(tokens: list[int], vocab_size: int) -> int:
    """Deterministic next token of a sequence (never 0, which tests use as a pad)."""
    tail = tokens[-16:]
    h = hashlib.blake2b(struct.pack(f"<{len(tail) + 1}i", len(tokens), *tail), digest_size=8)
    return 1 + int.from_bytes(h.digest(), "little") % (vocab_size - 1)


class SimExecutor:
    """Executes a StepPlan on a cost model instead of a model."""

    def __init__(
        self,
        clock: SimClock,
        cost_model: CostModel | None = None,
        step_cost: StepCost | None = None,
        vocab_size: int = 32000,
    ) -> None:
        self.clock = clock
        self.cost: CostModel = cost_model or CostModel.paper_default()
        self.step_cost = step_cost or StepCost()
        self.vocab_size = vocab_size
        self.completed: list[BlockCopy] = []
        self.last_step_s = 0.0

    def execute(self, plan: StepPlan) -> dict[str, int]:
        sc = self.step_cost
        decode = prefill = context = 0
        out: dict[str, int] = {}
        for ch in plan.chunks:
            if ch.num_tokens == 1 and ch.start == ch.request.num_tokens - 1:
                decode += 1
            else:
                prefill += ch.num_tokens
            context += ch.start + ch.num_tokens
            if ch.samples:
                out[ch.request.request_id] = fake_token(ch.request.all_token_ids, self.vocab_size)
        dt = sc.a + sc.b * decode + sc.c * prefill + sc.d * context if plan.chunks else sc.idle
        for c in plan.copies:
            dt += self.cost.copy_time(len(c.device_blocks), c.direction)
        self.completed.extend(plan.copies)
        self.last_step_s = dt
        self.clock.advance(dt)
        return out

    def landed_copies(self) -> tuple[list[BlockCopy], list[BlockCopy]]:
        """Copies of the steps executed since the last call (they never fail here)."""
        done, self.completed = self.completed, []
        return done, []


def sim_step(scheduler: Scheduler, executor: SimExecutor) -> tuple[StepPlan, list[Request]]:
    """One engine iteration on the simulator (the shared step loop), stopping on EOS.
    Returns the plan and the requests that finished."""
    plan, produced = StepLoop(scheduler, executor).step()
    finished = []
    for req in produced:
        if not req.status.finished and req.output_token_ids[-1] in req.eos_token_ids:
            scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        if req.status.finished:
            finished.append(req)
    return plan, finished
