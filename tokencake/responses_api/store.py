"""The server-side conversation store behind ``previous_response_id``.

Each stored response keeps the conversation it closes: the input history (without the
request's ``instructions``, which OpenAI does not carry over) plus the response's own output, as
Chat Completions messages. A later request naming it continues from there. The store is bounded
both in entries and in bytes (the JSON size of what it holds) and forgets the least recently
used responses first; a forgotten id is answered like an unknown one (404 upstream).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

DEFAULT_MAX_RESPONSES = 1024
DEFAULT_MAX_BYTES = 64 * 2**20


class ResponseStore:
    """LRU store of ``response id -> conversation messages``, bounded by count and bytes."""

    def __init__(
        self, max_responses: int = DEFAULT_MAX_RESPONSES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_responses < 1 or max_bytes < 1:
            raise ValueError("max_responses and max_bytes must be >= 1")
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> (json, size)
        self._bytes = 0
        self._lock = threading.Lock()  # handlers may run on several loops in tests

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes currently held (UTF-8 JSON of the stored conversations)."""
        return self._bytes

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> bool:
        """Store a conversation; returns False when it alone exceeds ``max_bytes`` (not kept)."""
        data = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
        size = len(data.encode())
        with self._lock:
            self._drop(response_id)
            if size > self.max_bytes:
                return False
            self._items[response_id] = (data, size)
            self._bytes += size
            while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
            return True

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        """The stored conversation (a fresh copy), or ``None`` if unknown or evicted."""
        with self._lock:
            hit = self._items.get(response_id)
            if hit is None:
                return None
            self._items.move_to_end(response_id)
        return json.loads(hit[0])

    def _drop(self, response_id: str) -> None:
        old = self._items.pop(response_id, None)
        if old is not None:
            self._bytes -= old[1]
