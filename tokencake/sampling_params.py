"""User-facing sampling parameters, validated at construction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokencake.row_controls import MAX_LOGIT_BIAS

if TYPE_CHECKING:
    from tokencake.structured import Structured

MAX_LOGPROBS = 20
MAX_N = 16  # choices per request


def _number_in(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        lo_b = "(" if lo_open else "["
        raise ValueError(f"{name} must be a number in {lo_b}{lo}, {hi}], got {value!r}")


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """Mapping token id (int or its decimal string, as JSON sends it) -> bias in [-100, 100]."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out: dict[int, float] = {}
    try:
        pairs = [tuple(p) for p in items]
    except TypeError:
        raise ValueError("logit_bias must map token ids to numbers") from None
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError("logit_bias must map token ids to numbers")
        tok, bias = pair
        if isinstance(tok, str) and tok.strip().isdigit():
            tok = int(tok)
        if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {tok!r}")
        _number_in(f"logit_bias[{tok}]", bias, -100.0, 100.0)
        out[tok] = float(bias)
    if len(out) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(out)} entries, at most {MAX_LOGIT_BIAS} allowed")
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes a sampled request reproducible regardless of what it is batched with.
    ``logprobs`` asks for the log-probability of each chosen token plus that many top
    alternatives (0 = only the chosen one, None = none).

    Logit adjustments (inside the jitted step; requests without them pay nothing):
    ``presence_penalty`` / ``frequency_penalty`` in [-2, 2] (OpenAI; over generated tokens),
    ``repetition_penalty`` in (0, 10] (1 = off; over prompt and generated tokens),
    ``logit_bias`` token id -> bias in [-100, 100] (at most 300 entries; stored as sorted
    ``(id, bias)`` pairs), ``min_p`` in [0, 1] (sampled rows only).
    ``n`` independent choices share the prompt's KV blocks (outputs carry ``index``).
    ``structured`` constrains the output to a grammar: a :class:`~tokencake.structured.JsonObject`,
    :class:`~tokencake.structured.JsonSchema`, :class:`~tokencake.structured.ToolCallGrammar`
    or :class:`~tokencake.structured.LarkGrammar`.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Any = None  # Mapping[int | str, float] in; tuple of (id, bias) pairs after
    min_p: float = 0.0
    n: int = 1
    structured: Structured | None = None

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
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if (
            not isinstance(self.top_k, int)
            or isinstance(self.top_k, bool)
            or not 0 <= self.top_k < 2**31
        ):
            raise ValueError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**31):
            raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )

        _number_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number_in("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        _number_in("min_p", self.min_p, 0.0, 1.0)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.structured is not None:
            from tokencake.structured import JsonObject, JsonSchema, LarkGrammar, ToolCallGrammar

            if not isinstance(
                self.structured, (JsonObject, JsonSchema, ToolCallGrammar, LarkGrammar)
            ):
                raise ValueError(
                    "structured must be JsonObject(), JsonSchema(schema), ToolCallGrammar(...) "
                    f"or LarkGrammar(...), got {self.structured!r}"
                )
            if self.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured output")

    @property
    def uses_logit_controls(self) -> bool:
        """True when a penalty, logit bias or grammar changes this request's logits."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
            or any(b != 0 for _, b in self.logit_bias)
            or self.structured is not None
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
