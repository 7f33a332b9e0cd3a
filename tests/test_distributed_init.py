"""``EngineConfig.distributed``: joining jax.distributed with the documented environment."""

from __future__ import annotations

import jax
import pytest

from tokencake.distributed import init_distributed


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record jax.distributed.initialize's arguments instead of contacting a coordinator."""
    seen: list[dict] = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_rank_and_count_come_from_the_documented_variables(
    calls: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")  # rank 0 is a real rank, not "unset"
    init_distributed()
    assert calls == [{"num_processes": 2, "process_id": 0}]


def test_unset_variables_leave_detection_to_jax(
    calls: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    init_distributed()
    assert calls == [{"num_processes": None, "process_id": None}]


def test_joins_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    init_distributed()
    assert seen == []
