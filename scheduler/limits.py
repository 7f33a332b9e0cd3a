"""Documented ranges of every client-supplied value, and the checks that enforce them.

One table for the library and the HTTP layer alike, so the bounds hold even when the server is
bypassed (``LLMEngine.add_request``, ``Scheduler.lifecycle_event``). Why bounds at all: the
scheduler does arithmetic on these values (scores, sums over agent types, EWMAs); unbounded
inputs overflow to ``inf``/``nan`` (``1e308 * 100``), make ``int()`` raise, or divide by a
subnormal. Each range is far beyond any real use and small enough that every sum the
schedulers form stays finite. Out of range is refused with :class:`RequestRejected` (400)
naming the field; nothing is clamped silently.

Integers are range-checked as Python ints *before* any float conversion, so ``10**400`` is a
clear error rather than an ``OverflowError`` deep inside ``math.isfinite``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from tokencake.scheduler.errors import RequestRejected

# ---- agent metadata (scheduler/metadata.py) ---------------------------------------------------
MAX_GRAPH_INT = 1_000_000  # depth, degrees, remaining/dependency depth, fan-out width
MAX_IMPORTANCE = 1e6
MAX_MEMORY_WEIGHT = 1e6
MIN_SIMILARITY = 1e-6  # similarity is 0 or in [1e-6, 1]: 1/similarity is a parallel width
MAX_TIMESTAMP_S = 1e10  # application_started_at_s (a clock reading; ~year 2286 as Unix time)
MAX_DURATION_S = 1e9  # application_elapsed_s / application_start_offset_s (~31 years)
MAX_NAME_CHARS = 256  # agent_type, agent_name, join_group, tool kind
MAX_ID_CHARS = 128  # lifecycle ids and request ids
MAX_EXTRA_KEYS = 32  # unknown metadata keys kept (as small scalars) in ``extra``

# ---- lifecycle events (scheduler/lifecycle.py) ------------------------------------------------
MAX_ESTIMATED_DURATION_S = 1e6  # estimated_duration_s is in (0, 1e6] (~11.6 days)

# ---- sampling parameters (tokencake/sampling_params.py) ---------------------------------------
MAX_TEMPERATURE = 100.0
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_INT32 = 2**31 - 1  # max_tokens, top_k, seed and token ids fit the sampler's int32

# Any printable characters: control characters (a newline above all) would forge log lines.
_ID_RE = re.compile(r"[^\x00-\x1f\x7f]{1," + str(MAX_ID_CHARS) + "}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(param: str, v: Any, lo: int, hi: int, label: str | None = None) -> int:
    """``v`` as an int in ``[lo, hi]`` (a bool is not an int)."""
    name = label or param
    if not _is_int(v):
        raise RequestRejected(param, f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        shown = v if -(10**30) < v < 10**30 else f"an integer of {len(str(abs(v)))} digits"
        raise RequestRejected(param, f"{name} must be in [{lo}, {hi}], got {shown}")
    return v


def check_number(
    param: str,
    v: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    label: str | None = None,
) -> float:
    """``v`` (int or float, not bool) as a finite float in ``[lo, hi]`` (``(lo, hi]`` with
    ``lo_open``). Ints are compared exactly before the conversion, so a 400-digit integer is a
    range error, never an ``OverflowError``."""
    name = label or param
    span = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
    if _is_int(v):
        if v < lo or v > hi or (lo_open and v == lo):
            shown = v if -(10**30) < v < 10**30 else f"an integer of {len(str(abs(v)))} digits"
            raise RequestRejected(param, f"{name} must be a number in {span}, got {shown}")
        return float(v)
    if not isinstance(v, float):
        raise RequestRejected(param, f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise RequestRejected(param, f"{name} must be a finite number in {span}, got {v!r}")
    return v


def check_string(
    param: str, v: Any, max_chars: int, *, nonempty: bool = False, label: str | None = None
) -> str:
    """``v`` as a string of at most ``max_chars`` characters."""
    name = label or param
    if not isinstance(v, str):
        raise RequestRejected(param, f"{name} must be a string, got {type(v).__name__}")
    if len(v) > max_chars:
        raise RequestRejected(param, f"{name} must be at most {max_chars} characters, got {len(v)}")
    if nonempty and not v:
        raise RequestRejected(param, f"{name} must be a non-empty string")
    return v


def check_id(param: str, v: Any, label: str | None = None) -> str:
    """A request or lifecycle id: 1-128 characters, none of them a control character, matched
    in full (``re.fullmatch``: a trailing newline is not accepted as ``$`` would)."""
    name = label or param
    if not isinstance(v, str) or not _ID_RE.fullmatch(v):
        raise RequestRejected(
            param,
            f"{name} must be a string of 1-{MAX_ID_CHARS} characters without control characters",
        )
    return v


def is_small_scalar(v: Any) -> bool:
    """A JSON scalar worth keeping for inspection: null, bool, a 64-bit int, a finite float or
    a string of at most ``MAX_NAME_CHARS`` characters."""
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -(2**63) <= v < 2**63
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, str) and len(v) <= MAX_NAME_CHARS


# ---- sequence length (scheduler/core.py) ------------------------------------------------------
def check_fits(
    num_prompt_tokens: int, max_tokens: int, max_model_len: int, block_size: int, capacity: int
) -> None:
    """Refuse a request that could never run: an empty prompt, prompt + ``max_tokens`` past
    the context limit, or more KV blocks at its longest than the whole device pool."""
    if num_prompt_tokens < 1:
        raise RequestRejected("prompt", "prompt must contain at least one token")
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise RequestRejected(
            "max_tokens",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) "
            f"exceeds the model context limit of {max_model_len} tokens",
        )
    blocks_needed = math.ceil(total / block_size)
    if blocks_needed > capacity:
        raise RequestRejected(
            "max_tokens",
            f"request needs up to {blocks_needed} KV blocks but the pool holds {capacity}",
        )
