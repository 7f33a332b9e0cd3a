"""Host-side state of a request's logit adjustments: penalty counts, logit bias, grammar.

The engine keeps one :class:`RowControls` per request that uses any of them (requests that
use none have ``None`` and cost nothing); the runner asks it to ``fill`` the request's row
of the step's :class:`~tokencake.models.logits_adjust.LogitsAdjust` arrays, and the engine
reports every accepted token with :meth:`RowControls.accept`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from tokencake.models.logits_adjust import LogitsAdjust

MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit); the runner's padded width


class TokenMask(Protocol):
    """A grammar's view as the runner needs it (see :class:`tokencake.structured.GrammarState`)."""

    def fill_mask(self, words: np.ndarray) -> None:
        """Write the packed allowed-token mask of the next token into ``words`` (int32)."""

    def accept(self, token: int) -> None:
        """Advance past a sampled token."""


class TokenCounts:
    """Distinct tokens of a request's context with how often each was generated, kept as
    arrays so filling a step row is one slice copy (no per-step Python over the context)."""

    def __init__(self, prompt: Sequence[int], capacity: int) -> None:
        self.ids = np.zeros(capacity, np.int32)
        self.counts = np.zeros(capacity, np.float32)
        self._slot: dict[int, int] = {}
        for t in prompt:
            self._add(t)

    def __len__(self) -> int:
        return len(self._slot)

    def _add(self, token: int) -> int:
        slot = self._slot.get(token)
        if slot is None:
            slot = self._slot[token] = len(self._slot)
            self.ids[slot] = token
        return slot

    def add_output(self, token: int) -> None:
        self.counts[self._add(token)] += 1.0


class RowControls:
    """Penalties, logit bias and an optional grammar of one request.

    ``capacity`` is the runner's ``penalty_capacity`` (>= any context length). The prompt's
    tokens are tracked only when the repetition penalty needs them.
    """

    def __init__(
        self,
        *,
        prompt: Sequence[int],
        capacity: int,
        presence: float = 0.0,
        frequency: float = 0.0,
        repetition: float = 1.0,
        logit_bias: Sequence[tuple[int, float]] = (),
        grammar: TokenMask | None = None,
    ) -> None:
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self.penalized = presence != 0 or frequency != 0 or repetition != 1
        self.counts = (
            TokenCounts(prompt if repetition != 1 else (), capacity) if self.penalized else None
        )
        self.bias_ids = np.array([t for t, _ in logit_bias], np.int32)
        self.bias_values = np.array([b for _, b in logit_bias], np.float32)
        self.grammar = grammar

    def accept(self, token: int) -> None:
        """Record a generated token (penalty counts, grammar state)."""
        if self.counts is not None:
            self.counts.add_output(token)
        if self.grammar is not None:
            self.grammar.accept(token)

    def fill(self, row: int, adj: LogitsAdjust) -> None:
        """Write this request's adjustments into row ``row`` of the step's (writable) arrays."""
        nb = len(self.bias_ids)
        adj.bias_ids[row, :nb] = self.bias_ids
        adj.bias_values[row, :nb] = self.bias_values
        if self.counts is not None:
            n = len(self.counts)
            adj.penalty_ids[row, :n] = self.counts.ids[:n]
            adj.penalty_counts[row, :n] = self.counts.counts[:n]
            adj.presence[row] = self.presence
            adj.frequency[row] = self.frequency
            adj.repetition[row] = self.repetition
        if self.grammar is not None:
            self.grammar.fill_mask(adj.token_mask[row])
