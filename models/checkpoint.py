"""Orbax checkpoints of dequantized models (``tokencake convert SRC DST``).

A GGUF load dequantizes every tensor (~5 s for SmolLM2); an orbax restore of the float32
params is several times faster and needs neither the GGUF nor torch. Layout of ``DST``::

    tokencake_checkpoint.json   marker + format version + ModelConfig (written last)
    params/                     orbax PyTree checkpoint of the canonical params dict
    tokenizer/                  tokenizer.json, tokenizer_config.json, chat template, stop ids
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokencake.models.config import ModelConfig
from tokencake.models.weights import validate_params

if TYPE_CHECKING:
    from tokencake.models.tokenizer import Tokenizer

FORMAT_VERSION = 1
MARKER = "tokencake_checkpoint.json"  # same name as hub.CHECKPOINT_MARKER


def _tokenizer_of(source: Any) -> Tokenizer:
    """A Tokenizer from a Tokenizer, a GGUF path or a HF/tokenizer folder."""
    from tokencake.models.tokenizer import Tokenizer

    if isinstance(source, Tokenizer):
        return source
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return Tokenizer.from_gguf(p)
    if p.is_dir():
        return Tokenizer.from_hf_folder(p / "tokenizer" if (p / MARKER).is_file() else p)
    raise ValueError(
        f"cannot get a tokenizer from {source!r} (expected Tokenizer, .gguf or folder)"
    )


def save_orbax(
    cfg: ModelConfig,
    params: dict[str, np.ndarray],
    tokenizer_source: Tokenizer | str | os.PathLike[str],
    dst: str | os.PathLike[str],
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``cfg``, ``params`` and the tokenizer to the checkpoint folder ``dst``.

    ``tokenizer_source`` is a :class:`Tokenizer` or a path it can be built from (GGUF file or HF
    folder). The marker file is written last, so an interrupted save is never mistaken for a
    checkpoint. Existing non-empty ``dst`` is an error unless ``overwrite``.
    """
    import orbax.checkpoint as ocp

    validate_params(cfg, params)
    out = Path(dst).expanduser().absolute()  # orbax requires absolute paths
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_of(tokenizer_source)

    from tqdm import tqdm

    keys = sorted(params)
    bar = tqdm(total=len(keys) + 2, desc="converting", unit="step", disable=not progress)
    tree: dict[str, np.ndarray] = {}
    for k in keys:
        bar.set_postfix_str(k)
        # Canonical params are float32 and C-contiguous; normalise so the restore is too.
        tree[k] = np.ascontiguousarray(params[k], dtype=np.float32)
        bar.update(1)
    bar.set_postfix_str("writing params")
    with ocp.PyTreeCheckpointer() as ck:
        ck.save(out / "params", tree)
    bar.update(1)
    bar.set_postfix_str("tokenizer")
    tok.save(out / "tokenizer")
    meta = {
        "format": "tokencake-orbax",
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "param_keys": keys,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    bar.update(1)
    bar.close()
    return out


def load_orbax(
    path: str | os.PathLike[str],
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Restore ``(config, params, tokenizer)`` from a folder written by :func:`save_orbax`."""
    import orbax.checkpoint as ocp

    from tokencake.models.tokenizer import Tokenizer

    d = Path(path).expanduser().absolute()
    marker = d / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{d} is not a tokencake checkpoint (no {MARKER})")
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt checkpoint marker {marker}: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{d}: checkpoint format version {meta.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION}); re-run `tokencake convert`"
        )
    cfg = ModelConfig.from_dict(meta["config"])
    # Restore as numpy (the canonical format), not as device arrays.
    restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in meta["param_keys"]}
    with ocp.PyTreeCheckpointer() as ck:
        params = ck.restore(d / "params", args=ocp.args.PyTreeRestore(restore_args=restore_args))
    params = {k: np.asarray(v) for k, v in params.items()}
    validate_params(cfg, params)
    return cfg, params, Tokenizer.from_hf_folder(d / "tokenizer")


def convert(
    src: str | os.PathLike[str] | None,
    dst: str | os.PathLike[str],
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert a model (GGUF file, HF folder, or ``None`` for the default) to an orbax checkpoint."""
    from tokencake.models.hub import DEFAULT_GGUF, DEFAULT_MODEL, default_model_path

    if src is None:
        src_path = default_model_path()
        name = DEFAULT_MODEL if src_path.name == DEFAULT_GGUF else src_path.stem
    else:
        src_path = Path(src).expanduser()
        name = src_path.stem if src_path.is_file() else src_path.name
    if not src_path.exists():
        raise FileNotFoundError(f"source model not found: {src_path}")
    if src_path.is_file() and src_path.suffix.lower() == ".gguf":
        from tokencake.models.gguf_loader import load_gguf, open_gguf
        from tokencake.models.tokenizer import Tokenizer

        reader = open_gguf(src_path)
        cfg, params = load_gguf(src_path, reader=reader, name=name, progress=progress)
        tok = Tokenizer.from_gguf(src_path, reader=reader)
    else:
        from tokencake.models.hub import resolve_model

        cfg, params, tok, _ = resolve_model(src_path)
    return save_orbax(cfg, params, tok, dst, progress=progress, overwrite=overwrite)
