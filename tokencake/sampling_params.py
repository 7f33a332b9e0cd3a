"""User-facing sampling parameters, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokencake.scheduler.errors import RequestRejected

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes a sampled request reproducible regardless of what it is batched with.
    ``logprobs`` asks for the log-probability of each chosen token plus that many top
    alternatives (0 = only the chosen one, None = none). A bad value raises
    :class:`RequestRejected` naming the field.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or self.max_tokens < 1
        ):
            raise RequestRejected(
                "max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
            )
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise RequestRejected(
                "temperature", f"temperature must be in [0, 100], got {self.temperature!r}"
            )
        if (
            not isinstance(self.top_k, int)
            or isinstance(self.top_k, bool)
            or not 0 <= self.top_k < 2**31
        ):
            raise RequestRejected(
                "top_k", f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}"
            )
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise RequestRejected("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**31):
            raise RequestRejected(
                "seed", f"seed must be an integer in [0, 2**31), got {self.seed!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestRejected("stop", "stop must be a list of non-empty strings")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise RequestRejected(
                "logprobs",
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
