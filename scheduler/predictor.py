"""Tool-call duration predictor (paper digest §5.2).

A prediction blends the client's estimate with the learned history, 50/50 when both exist.
History is an EWMA (alpha 0.5 by default; the first sample is stored raw) of server-measured
durations, keyed by (agent type, tool kind), falling back to (agent name, tool kind), then to the
tool kind alone (every sample also feeds the kind's function-wide history: an agent seen for the
first time, or one with no identity at all, still gets the function's typical duration; a tool
call inferred from the protocol has the function name as its kind). Memory is
bounded by bytes (keys are client strings; see ``bounded.py``) and a key unused for ``ttl_s``
expires. With neither estimate nor history the default is 1 s.

Defence in depth: the history never holds a non-finite or negative value, and a non-finite
estimate is ignored, whatever a caller bypassing validation passes in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tokencake.scheduler.bounded import ByteLRU

HistoryKey = tuple[str, str, str]


class DurationPredictor:
    """Predicts how long a tool call will stall its agent."""

    def __init__(
        self,
        alpha: float = 0.5,
        default_s: float = 1.0,
        limit: int = 4096,
        max_bytes: int = 4 * 2**20,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not (math.isfinite(default_s) and default_s > 0):
            raise ValueError(f"default_s must be > 0, got {default_s}")
        self.alpha = alpha
        self.default_s = default_s
        self.limit = limit
        self.clock = clock or (lambda: 0.0)
        self._history: ByteLRU[HistoryKey, float] = ByteLRU(max_bytes, ttl_s, max_entries=limit)

    @staticmethod
    def key(agent_type: str, agent_name: str, kind: str) -> HistoryKey | None:
        """Type is the better key (all instances of an agent type call the same tools)."""
        if agent_type:
            return ("type", agent_type, kind)
        if agent_name:
            return ("name", agent_name, kind)
        return None

    def history(self, key: HistoryKey | None) -> float | None:
        if key is None:
            return None
        return self._history.get(key, self.clock())

    def __len__(self) -> int:
        return len(self._history)

    @property
    def nbytes(self) -> int:
        """Bytes charged to the history (keys plus per-entry overhead)."""
        return self._history.nbytes

    def predict(self, agent_type: str, agent_name: str, kind: str, estimate: float | None) -> float:
        """Seconds the stall is expected to last (table in §5.2)."""
        hist = self.history(self.key(agent_type, agent_name, kind))
        if hist is None:
            hist = self.history(("tool", "", kind))
        if estimate is not None and not (math.isfinite(estimate) and estimate > 0):
            estimate = None
        if estimate is None:
            return self.default_s if hist is None else hist
        return estimate if hist is None else 0.5 * (estimate + hist)

    def learn(self, agent_type: str, agent_name: str, kind: str, sample_s: float) -> None:
        """Fold one observed duration into the agent's history and the kind's."""
        if not (math.isfinite(sample_s) and sample_s >= 0):
            return
        now = self.clock()
        self._history.expire(now)
        for key in (self.key(agent_type, agent_name, kind), ("tool", "", kind)):
            if key is None:
                continue
            prev = self._history.get(key, now)
            value = sample_s if prev is None else self.alpha * sample_s + (1 - self.alpha) * prev
            if math.isfinite(value):
                self._history.put(key, value, now)
