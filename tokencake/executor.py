"""The real executor: the model runner and the KV transfer engine behind the step loop's
:class:`~tokencake.scheduler.step_loop.Executor` interface (the simulated one is
``scheduler/sim_executor.py``)."""

from __future__ import annotations

from collections.abc import Callable

from tokencake.memory.transfer import TransferEngine, TransferHandle
from tokencake.runner import ModelRunner, RowSampling, SampledToken, rows_from_chunks
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.plan import BlockCopy, StepPlan
from tokencake.scheduler.request import Request

#: One request's sampling settings (from the engine's per-request state).
SamplingOf = Callable[[Request], RowSampling]


class EngineExecutor:
    """Runs plans on the device: copies through the transfer engine (when the host tier is
    on), then one jitted step over the paged KV."""

    def __init__(
        self,
        runner: ModelRunner,
        transfer: TransferEngine | None,
        copies: CopyTracker,
        sampling_of: SamplingOf,
    ) -> None:
        self.runner = runner
        self.transfer = transfer
        self.copies = copies  # the scheduler's tracker: its fences are checked before a step
        self.sampling_of = sampling_of
        self.samples: dict[str, SampledToken] = {}  # the last step's, with logprobs
        self._copy_of: dict[int, BlockCopy] = {}  # transfer handle id -> the plan's copy
        self._landed: list[TransferHandle] = []  # finished while waiting, not reported yet

    def execute(self, plan: StepPlan) -> dict[str, int]:
        # Copies go first: a copy-out must read pages before this step's writes, and JAX's
        # dataflow then orders them; the tracker's fences make that order not matter.
        self._issue(plan.copies)
        self.samples = {}
        if not plan.chunks:
            if self.copies.in_flight and self.transfer is not None:
                # Nothing runnable until a copy lands: wait a little instead of spinning.
                self._landed += self.transfer.wait(timeout=0.01)
            return {}
        rows = rows_from_chunks(plan.chunks, self.sampling_of)
        if self.transfer is not None:
            self._check_fences(plan)
        self.samples = self.runner.execute(rows)
        return {k: v.token for k, v in self.samples.items()}

    def landed_copies(self) -> tuple[list[BlockCopy], list[BlockCopy]]:
        if self.transfer is None:
            return [], []
        finished, self._landed = self._landed + self.transfer.poll(), []
        done = [self._copy_of.pop(h.id) for h in finished if h.error is None]
        failed = [self._copy_of.pop(h.id) for h in finished if h.error is not None]
        return done, failed

    def wait_copies(self) -> None:
        """Block until every copy in flight has finished (reported by the next
        :meth:`landed_copies`)."""
        if self.transfer is not None:
            self._landed += self.transfer.wait()

    def _issue(self, copies: list[BlockCopy]) -> None:
        if not copies:
            return
        if self.transfer is None:
            raise RuntimeError("the scheduler emitted KV copies but the host tier is off")
        for c in copies:
            h = self.transfer.issue(c.direction, c.device_blocks, c.host_blocks, c.tag)
            self._copy_of[h.id] = c

    def _check_fences(self, plan: StepPlan) -> None:
        bs = self.runner.cfg.page_size
        attended, written = [], []
        for c in plan.chunks:
            end = -(-(c.start + c.num_tokens) // bs)
            attended.append(c.request.block_ids[:end])
            written.append(c.request.block_ids[c.start // bs : end])
        self.copies.check_step(attended, written)
