"""User-facing sampling parameters, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.limits import (
    MAX_INT32,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    check_int,
    check_number,
    check_string,
)

MAX_LOGPROBS = 20


def _check_sizes(p: SamplingParams) -> None:
    """Bounds on the client-sized fields (see scheduler/limits.py); ints before floats."""
    check_int("max_tokens", p.max_tokens, 1, MAX_INT32)
    check_number("temperature", p.temperature, 0.0, MAX_TEMPERATURE)
    check_number("top_p", p.top_p, 0.0, 1.0, lo_open=True)
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise RequestRejected("stop", f"stop allows at most {MAX_STOP_SEQUENCES} sequences")
    for s in p.stop:
        check_string("stop", s, MAX_STOP_CHARS, nonempty=True, label="each stop sequence")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestRejected(
            "stop_token_ids", f"stop_token_ids allows at most {MAX_STOP_TOKEN_IDS} ids"
        )
    for t in p.stop_token_ids:
        check_int("stop_token_ids", t, 0, MAX_INT32, label="each stop token id")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes a sampled request reproducible regardless of what it is batched with.
    ``logprobs`` asks for the log-probability of each chosen token plus that many top
    alternatives (0 = only the chosen one, None = none).

    Ranges: ``max_tokens`` in [1, 2**31), ``temperature`` in [0, 100], ``top_p`` in (0, 1],
    ``top_k`` in [0, 2**31), ``seed`` in [0, 2**31); at most 16 ``stop`` strings of at most
    1024 characters each and at most 1024 ``stop_token_ids`` in [0, 2**31). A bad value
    raises :class:`RequestRejected` naming the field.
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
        _check_sizes(self)
        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or self.max_tokens < 1
        ):
            raise RequestRejected(
                "max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
            )
        if (
            not isinstance(self.top_k, int)
            or isinstance(self.top_k, bool)
            or not 0 <= self.top_k < 2**31
        ):
            raise RequestRejected(
                "top_k", f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}"
            )
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
