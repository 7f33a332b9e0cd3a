"""Tool-call duration predictor (paper digest §5.2).

A prediction blends the client's estimate with the learned history, 50/50 when both exist.
History is an EWMA (alpha 0.5 by default; the first sample is stored raw) of server-measured
durations, keyed by (agent type, tool kind), falling back to (agent name, tool kind); an LRU of
4096 keys bounds memory. With neither estimate nor history the default is 1 s.
"""

from __future__ import annotations

from collections import OrderedDict

HistoryKey = tuple[str, str, str]


class DurationPredictor:
    """Predicts how long a tool call will stall its agent."""

    def __init__(self, alpha: float = 0.5, default_s: float = 1.0, limit: int = 4096) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if default_s <= 0:
            raise ValueError(f"default_s must be > 0, got {default_s}")
        self.alpha = alpha
        self.default_s = default_s
        self.limit = limit
        self._history: OrderedDict[HistoryKey, float] = OrderedDict()

    @staticmethod
    def key(agent_type: str, agent_name: str, kind: str) -> HistoryKey | None:
        """Type is the better key (all instances of an agent type call the same tools)."""
        if agent_type:
            return ("type", agent_type, kind)
        if agent_name:
            return ("name", agent_name, kind)
        return None

    def history(self, key: HistoryKey | None) -> float | None:
        if key is None or key not in self._history:
            return None
        self._history.move_to_end(key)
        return self._history[key]

    def predict(self, agent_type: str, agent_name: str, kind: str, estimate: float | None) -> float:
        """Seconds the stall is expected to last (table in §5.2)."""
        hist = self.history(self.key(agent_type, agent_name, kind))
        if estimate is None:
            return self.default_s if hist is None else hist
        return estimate if hist is None else 0.5 * (estimate + hist)

    def learn(self, agent_type: str, agent_name: str, kind: str, sample_s: float) -> None:
        """Fold one observed duration into the history (no key: nothing to learn into)."""
        key = self.key(agent_type, agent_name, kind)
        if key is None or sample_s < 0:
            return
        prev = self._history.get(key)
        self._history[key] = (
            sample_s if prev is None else self.alpha * sample_s + (1 - self.alpha) * prev
        )
        self._history.move_to_end(key)
        while len(self._history) > self.limit:
            self._history.popitem(last=False)
