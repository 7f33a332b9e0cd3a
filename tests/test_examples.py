"""The examples against a server that requires an API key: they read ``TOKENCAKE_API_KEY``, and a
missing or wrong key (or no server) ends them with one clear line instead of a traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.test_server import make_async_engine
from tokencake.runtime import HTTPTarget, HTTPTargetError
from tokencake.server import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keyed(tiny_model):
    engine = make_async_engine(tiny_model)
    server = BackgroundServer(engine, api_key="sekret")
    yield server
    server.stop()
    engine.shutdown()


def _generate(url: str, api_key: str | None):
    async def main():
        async with HTTPTarget(url, api_key=api_key) as target:
            rid = "tc-" + uuid.uuid4().hex
            return await target.generate("hello", 4, rid, {"lifecycle_id": rid}, 0.0)

    return asyncio.run(main())


def test_http_target_names_the_key_problem(keyed):
    assert _generate(keyed.url, "sekret").completion_tokens == 4
    with pytest.raises(HTTPTargetError, match="is missing .*TOKENCAKE_API_KEY"):
        _generate(keyed.url, None)
    with pytest.raises(HTTPTargetError, match="is wrong"):
        _generate(keyed.url, "nope")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HTTPTargetError, match="cannot reach"):
        _generate(dead, None)


@pytest.mark.parametrize("example", ["code_writer.py", "deep_research.py"])
def test_example_reads_the_env_key_and_fails_in_one_line(keyed, example):
    def run(env_key: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "TOKENCAKE_API_KEY"}
        if env_key is not None:
            env["TOKENCAKE_API_KEY"] = env_key
        return subprocess.run(
            [sys.executable, str(ROOT / "examples" / example), "--url", keyed.url],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    for env_key, needle in ((None, "is missing"), ("nope", "is wrong")):
        proc = run(env_key)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"{example}: ") and needle in lines[0]
        assert "TOKENCAKE_API_KEY" in lines[0] and "Traceback" not in proc.stderr
