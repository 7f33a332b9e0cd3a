"""Tokencake-JAX: a KV-cache-centric serving engine for LLM multi-agent applications."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# transformers logs "PyTorch was not found" on import; we only use its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"

# Lazy exports keep `import tokencake.scheduler` (pure Python) free of JAX.
_EXPORTS = {
    "LLM": "tokencake.llm",
    "LLMEngine": "tokencake.engine",
    "AsyncEngine": "tokencake.async_engine",
    "EngineConfig": "tokencake.config",
    "SamplingParams": "tokencake.sampling_params",
    "RequestOutput": "tokencake.outputs",
}

if TYPE_CHECKING:
    from tokencake.async_engine import AsyncEngine
    from tokencake.config import EngineConfig
    from tokencake.engine import LLMEngine
    from tokencake.llm import LLM
    from tokencake.outputs import RequestOutput
    from tokencake.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineConfig", "LLM", "LLMEngine", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokencake' has no attribute {name!r}")
