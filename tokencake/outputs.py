"""What the engine reports back: a request's progress after each step, and pool occupancy."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """Progress of one request. ``text``/``token_ids`` are cumulative; ``delta_text`` and
    ``delta_token_ids`` are what is new since the previous report (what a stream emits).

    With ``n > 1`` each choice reports under the request's id with its ``index``;
    ``finished`` is per choice, and the request is done when a finished output has
    ``choices_left == 0`` (:attr:`request_finished`)."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Set when the request was aborted by a failure: a RequestFault (its own data broke the
    # scheduler, a policy or postprocessing) or a StepFailed (the device step it was in failed).
    error: BaseException | None = None
    index: int = 0  # choice index (n > 1)
    choices_left: int = 0  # other choices of this request still running (n > 1)

    @property
    def request_finished(self) -> bool:
        """True on the last output of the request (every choice finished)."""
        return self.finished and self.choices_left == 0


@dataclass(frozen=True)
class KVStats:
    """Device KV blocks and scheduler queues at one moment."""

    capacity: int  # usable device blocks
    used: int  # owned by live requests
    cached: int  # evictable prefix-cache blocks
    waiting: int  # requests waiting for admission
    running: int

    @property
    def usage(self) -> float:
        """Fraction of the device blocks in use."""
        return self.used / self.capacity if self.capacity else 0.0
