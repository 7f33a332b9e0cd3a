"""A request's text as the engine streams it: incremental detokenization, stop strings, the
held-back tail a stream must not show yet, and the :class:`RequestOutput` of each step.

The engine (``engine.py``) decides what a new token does to the request (end of sequence,
length limit, logit controls, choice fan-out); this module only turns tokens into text and
outputs, so the stop-string rules live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokencake.models.tokenizer import IncrementalDetokenizer
from tokencake.outputs import RequestOutput, TokenLogprob
from tokencake.row_controls import RowControls
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.request import Request, RequestStatus


@dataclass
class TextState:
    """Per-request detokenization and stop-string state kept by the engine."""

    params: SamplingParams
    seed: int
    detok: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    controls: RowControls | None = None  # penalties / logit bias / grammar, if any
    index: int = 0  # choice index (n > 1)

    def feed(self, token: int) -> bool:
        """Append ``token``'s text; True when a stop string now appears (the text is cut at
        it, keeping the stop string only if the request asked for it)."""
        params = self.params
        self.text += self.detok.feed(token)
        for stop in params.stop:
            # Only text from just before the last emitted character can hold a new match.
            idx = self.text.find(stop, max(0, self.emitted_chars - len(stop)))
            if idx >= 0:
                keep = len(stop) if params.include_stop_str_in_output else 0
                self.text = self.text[: idx + keep]
                return True
        return False

    def output(self, req: Request) -> RequestOutput:
        """The output of the step that just gave ``req`` a token: the new visible text and
        tokens since the previous output. A finished request's detokenizer is flushed (unless
        a stop string or end of sequence ended it)."""
        params = self.params
        finished = req.status.finished
        if finished and req.status is not RequestStatus.FINISHED_STOPPED:
            self.text += self.detok.flush()
        # Hold back a possible stop-string prefix so a stream never shows text it must retract.
        hold = 0 if finished or not params.stop else max(len(s) for s in params.stop) - 1
        visible = max(self.emitted_chars, len(self.text) - hold)
        delta = self.text[self.emitted_chars : visible]
        self.emitted_chars = visible
        delta_ids = req.output_token_ids[self.emitted_tokens :]
        self.emitted_tokens = len(req.output_token_ids)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            text=self.text[:visible],
            token_ids=list(req.output_token_ids),
            delta_text=delta,
            delta_token_ids=list(delta_ids),
            finished=finished,
            finish_reason=req.status.value if finished else None,
            logprobs=list(self.logprobs) if params.logprobs is not None else None,
            num_cached_tokens=req.num_cached_tokens,
            metrics=request_metrics(req) if finished else {},
        )


def error_output(req: Request, error: BaseException) -> RequestOutput:
    """The final output of a request aborted by ``error`` (its tokens so far, no new text)."""
    return RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        token_ids=list(req.output_token_ids),
        finished=True,
        finish_reason=RequestStatus.FINISHED_ABORTED.value,
        num_cached_tokens=req.num_cached_tokens,
        metrics=request_metrics(req),
        error=error,
    )


def request_metrics(req: Request) -> dict[str, float]:
    """A finished request's per-request figures (preemptions, recomputed tokens, latencies)."""
    out = {
        "num_preemptions": float(req.num_preemptions),
        "recomputed_tokens": float(req.num_recomputed_tokens),
    }
    if req.first_token_time is not None:
        out["ttft_s"] = req.first_token_time - req.arrival_time
    if req.finish_time is not None:
        out["e2e_s"] = req.finish_time - req.arrival_time
    return out
