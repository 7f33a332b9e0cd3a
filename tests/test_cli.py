"""The first start of ``tokencake serve``: a taken port is refused at once with a hint, ``--help``
shows defaults, the default model's served name works as ``--model``, JAX's TPU probe is quiet,
and a start prints a progress bar and the URL it serves on."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_models import write_gguf
from tokencake.cli import build_parser
from tokencake.logs import _NoTpuProbe
from tokencake.models import hub
from tokencake.models.config import tiny_config
from tokencake.models.tokenizer import Tokenizer
from tokencake.models.weights import random_params

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tokencake.cli", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def test_taken_port_is_refused_before_the_model_loads():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _cli("serve", "--port", str(port))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"127.0.0.1:{port}" in lines[0] and "--port" in lines[0]
    assert "loading" not in err and out == ""  # refused before anything was loaded


def test_help_shows_defaults():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    text = " ".join(sub["serve"].format_help().split())
    for default in ("(default: 8000)", "(default: 127.0.0.1)", "(default: vllm)",
                    "(default: SmolLM2-135M-Instruct)", "(default: text)"):  # fmt: skip
        assert default in text, default
    assert "(default: 0.0)" in " ".join(sub["generate"].format_help().split())


def test_served_model_name_selects_the_default_model(tmp_path, monkeypatch):
    cfg = tiny_config()
    gguf = write_gguf(
        tmp_path / hub.DEFAULT_GGUF, cfg, random_params(cfg), Tokenizer.byte_level_for_tests()
    )
    monkeypatch.setattr(hub, "default_model_path", lambda: gguf)
    monkeypatch.chdir(tmp_path)
    got_cfg, _, _, name = hub.resolve_model(hub.DEFAULT_MODEL)
    assert name == hub.DEFAULT_MODEL
    assert got_cfg.sampling_defaults == hub.DEFAULT_SAMPLING  # the GGUF has none of its own
    assert build_parser().parse_args(["serve"]).model == hub.DEFAULT_MODEL
    # A folder of that name here is a path, as any other model path is.
    (tmp_path / hub.DEFAULT_MODEL).mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        hub.resolve_model(hub.DEFAULT_MODEL)


def test_tpu_probe_line_is_dropped_only_when_libtpu_is_absent():
    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("jax._src.xla_bridge", logging.INFO, "", 0, msg, None, None)

    f = _NoTpuProbe()
    assert not f.filter(
        record(
            "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: "
            "libtpu.so: cannot open shared object file: No such file or directory"
        )
    )
    assert f.filter(record("Unable to initialize backend 'tpu': UNAVAILABLE: TPU busy"))
    assert f.filter(record("Unable to initialize backend 'cuda'"))


@pytest.mark.slow
def test_serve_shows_progress_and_the_url(tmp_path):
    """A real start on a tiny GGUF: a warm-up bar (N/N shapes), then one plain line with the
    URL, no TPU probe line; SIGINT stops it cleanly."""
    cfg = tiny_config()
    gguf = write_gguf(
        tmp_path / "tiny.gguf", cfg, random_params(cfg), Tokenizer.byte_level_for_tests()
    )
    # A fresh compilation cache of its own (conftest turns the cache off for the suite): the
    # start-up message about it is part of what a user sees.
    proc = _cli("serve", "--model", str(gguf), "--port", "0", "--max-model-len", "64",
                "--max-num-seqs", "2", env_extra={"TOKENCAKE_XLA_CACHE": str(tmp_path / "xla")})  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("serving tiny on http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split(";")[0])
        assert port > 0
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "warming up" in err and "later starts read them from the cache" in err
    assert "compiling step shapes" in err and "Unable to initialize backend" not in err


def test_tokencake_config_file_reaches_the_policy(tmp_path, make_engine, capsys):
    from tokencake.cli import engine_config_from_args, main

    f = tmp_path / "tc.json"
    f.write_text('{"scheduling": {"critical_ratio": 0.5}, "offload": {"enabled": false}}')
    args = build_parser().parse_args(
        ["serve", "--policy", "tokencake", "--tokencake-config", str(f)]
    )
    cfg = engine_config_from_args(args)
    assert cfg.tokencake.scheduling.critical_ratio == 0.5 and not cfg.tokencake.offload.enabled
    engine = make_engine(policy="tokencake", tokencake=cfg.tokencake)
    assert engine.scheduler.policy.config.scheduling.critical_ratio == 0.5
    # A bad file is one line naming the problem, before anything loads.
    for text, needle in (
        ('{"scheduling": {"critical_ratoi": 0.5}}', "critical_ratoi"),
        ("{not json", "not valid JSON"),
        ("[1]", "expected a JSON object"),
    ):
        f.write_text(text)
        assert main(["serve", "--port", "0", "--tokencake-config", str(f)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main(["serve", "--tokencake-config", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
