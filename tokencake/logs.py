"""Logging set-up for the command line and the server: plain text or one JSON object a line,
and JAX's TPU probe kept quiet where there is no TPU."""

from __future__ import annotations

import json
import logging
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages that already are JSON objects are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        try:
            parsed = json.loads(msg)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            entry.update(parsed)
        else:
            entry["message"] = msg
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _NoTpuProbe(logging.Filter):
    """Drops JAX's "Unable to initialize backend 'tpu'" record when libtpu is simply not
    installed (every CPU/GPU start logs it; it reads like an error and is not one). A TPU host
    whose libtpu fails for another reason still sees its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Unable to initialize backend 'tpu'" in msg and "libtpu.so" in msg)


_TPU_FILTER = _NoTpuProbe()


def quiet_tpu_probe() -> None:
    """Install the filter on JAX's backend-discovery logger (idempotent)."""
    logger = logging.getLogger("jax._src.xla_bridge")
    if _TPU_FILTER not in logger.filters:
        logger.addFilter(_TPU_FILTER)


def setup_json_logging(level: int = logging.INFO) -> None:
    """Every record as one JSON line on stderr (``tokencake serve --log-format json``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_tpu_probe()


def setup_text_logging(level: int = logging.WARNING) -> None:
    """Plain ``time level logger: message`` lines on stderr (the default)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_tpu_probe()
