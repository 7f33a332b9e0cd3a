"""User-facing sampling parameters, validated at construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokencake.row_controls import MAX_LOGIT_BIAS
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

if TYPE_CHECKING:
    from tokencake.structured import Structured

MAX_LOGPROBS = 20
MAX_N = 16  # choices per request


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """Mapping token id (int or its decimal string, as JSON sends it) -> bias in [-100, 100]."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out: dict[int, float] = {}
    try:
        pairs = [tuple(p) for p in items]
    except TypeError:
        raise RequestRejected("logit_bias", "logit_bias must map token ids to numbers") from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise RequestRejected(
            "logit_bias", f"logit_bias has {len(pairs)} entries, at most {MAX_LOGIT_BIAS} allowed"
        )
    for pair in pairs:
        if len(pair) != 2:
            raise RequestRejected("logit_bias", "logit_bias must map token ids to numbers")
        tok, bias = pair
        if isinstance(tok, str) and tok.isascii() and tok.isdigit() and len(tok) <= 10:
            tok = int(tok)
        if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < MAX_INT32:
            shown = tok if isinstance(tok, int) else repr(tok)[:40]
            raise RequestRejected(
                "logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {shown}"
            )
        out[tok] = check_number("logit_bias", bias, -100.0, 100.0, label=f"logit_bias[{tok}]")
    return tuple(sorted(out.items()))


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

    Logit adjustments (inside the jitted step; requests without them pay nothing):
    ``presence_penalty`` / ``frequency_penalty`` in [-2, 2] (OpenAI; over generated tokens),
    ``repetition_penalty`` in (0, 10] (1 = off; over prompt and generated tokens),
    ``logit_bias`` token id -> bias in [-100, 100] (at most 300 entries; stored as sorted
    ``(id, bias)`` pairs), ``min_p`` in [0, 1] (sampled rows only).
    ``n`` in [1, 16] independent choices share the prompt's KV blocks (outputs carry
    ``index``). ``structured`` constrains the output to a grammar: a
    :class:`~tokencake.structured.JsonObject`, :class:`~tokencake.structured.JsonSchema`,
    :class:`~tokencake.structured.ToolCallGrammar` or :class:`~tokencake.structured.LarkGrammar`.
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
        check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        check_number("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        check_number("min_p", self.min_p, 0.0, 1.0)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        check_int("n", self.n, 1, MAX_N)
        if self.structured is not None:
            from tokencake.structured import JsonObject, JsonSchema, LarkGrammar, ToolCallGrammar

            if not isinstance(
                self.structured, (JsonObject, JsonSchema, ToolCallGrammar, LarkGrammar)
            ):
                raise RequestRejected(
                    "structured",
                    "structured must be JsonObject(), JsonSchema(schema), ToolCallGrammar(...) "
                    f"or LarkGrammar(...), got {type(self.structured).__name__}",
                )
            if self.ignore_eos:
                raise RequestRejected(
                    "ignore_eos", "ignore_eos cannot be combined with structured output"
                )

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
