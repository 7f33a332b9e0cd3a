"""Run a check script in a fresh process with its own simulated CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_device_check(script: Path, n: int, *args: str, timeout: float) -> dict:
    """Run ``script n *args`` without this process's XLA_FLAGS (the script sets its own device
    count); return the JSON object on its last stdout line, or fail with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(script), str(n), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
