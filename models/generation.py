"""A model's own sampling defaults (temperature, top_p, top_k), read from its files.

The OpenAI-compatible server uses them for a request that omits those fields, as vLLM does with
``--generation-config auto``: from a Hugging Face folder's ``generation_config.json`` only the
values that differ from ``transformers``' own defaults (temperature 1.0, top_p 1.0, top_k 50;
vLLM reads ``GenerationConfig.to_diff_dict()``), and from a GGUF file the ``general.sampling.*``
keys llama.cpp defines. A request's explicit values always win.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# transformers' GenerationConfig defaults: a value equal to these is not a recommendation.
_HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
_GGUF_KEYS = {
    "temperature": "general.sampling.temp",
    "top_p": "general.sampling.top_p",
    "top_k": "general.sampling.top_k",
}


def checked(values: dict[str, Any], where: str) -> dict[str, float | int]:
    """Keep the well-formed sampling defaults of ``values``; a malformed one raises naming it
    (a model file that recommends ``top_p: 7`` is broken, not a request to ignore)."""
    out: dict[str, float | int] = {}
    for key, v in values.items():
        if v is None:
            continue
        if key == "top_k":
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}: top_k must be an integer >= 0, got {v!r}")
            out[key] = int(v)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: {key} must be a number, got {v!r}")
        if key == "temperature" and not 0 <= v <= 2:
            raise ValueError(f"{where}: temperature must be in [0, 2], got {v}")
        if key == "top_p" and not 0 < v <= 1:
            raise ValueError(f"{where}: top_p must be in (0, 1], got {v}")
        out[key] = round(float(v), 6)  # float32 metadata 0.9 reads 0.8999999762
    return out


def from_gguf(reader: Any) -> dict[str, float | int]:
    """The ``general.sampling.{temp,top_p,top_k}`` values of an open GGUF file."""
    from tokencake.models.gguf_loader import field_value

    values = {key: field_value(reader, gguf_key) for key, gguf_key in _GGUF_KEYS.items()}
    return checked(values, "GGUF general.sampling")


def from_hf_folder(path: str | os.PathLike[str]) -> dict[str, float | int]:
    """The recommendations in ``<path>/generation_config.json`` (absent file: none)."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    data = json.loads(f.read_text())
    values = {
        key: data[key]
        for key in _HF_DEFAULTS
        if key in data and data[key] is not None and data[key] != _HF_DEFAULTS[key]
    }
    return checked(values, str(f))
