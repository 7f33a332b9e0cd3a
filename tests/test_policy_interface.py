"""The policy seam (issue 16): a policy is built from a typed PolicyContext, names come from the
registry, the engine config carries Tokencake's settings and builds the scheduler's and the
runner's configs, and admission verdicts mean what they say."""

from __future__ import annotations

import pytest

from tokencake.config import EngineConfig
from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler import policies
from tokencake.scheduler.config import SchedulerConfig
from tokencake.scheduler.core import Scheduler
from tokencake.scheduler.policy import Admission, Policy, PolicyContext
from tokencake.scheduler.request import Request
from tokencake.scheduler.sim_executor import SimClock
from tokencake.scheduler.tokencake_config import TimeConfig, TokencakeConfig


class _Refuse(Policy):
    """Refuses request "a" with a fixed verdict; admits everyone else."""

    verdict = Admission.STOP

    def admit(self, request, blocks_needed, running):
        return self.verdict if request.request_id == "a" else Admission.ADMIT


class _Defer(_Refuse):
    verdict = Admission.DEFER


def _admitted(factory) -> list[str]:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_prefill_chunk=64),
                  BlockPool(33, 16), factory, SimClock())  # fmt: skip
    for rid, t in (("a", 0.0), ("b", 1.0)):
        s.add_request(Request(rid, [1, 2, 3], 4, t))
    return [c.request.request_id for c in s.schedule().chunks]


def test_admission_verdicts():
    assert _admitted(Policy) == ["a", "b"]
    assert _admitted(_Refuse) == []  # STOP: strict order, nobody jumps the head
    assert _admitted(_Defer) == ["b"]  # DEFER: only "a" waits


def test_policy_gets_the_schedulers_own_state_at_construction():
    seen: list[PolicyContext] = []

    def factory(ctx: PolicyContext) -> Policy:
        seen.append(ctx)
        return Policy(ctx)

    pool, host, clock = BlockPool(9, 16), HostBlockPool(5, 16), SimClock()
    cost = CostModel.fixed(1024, bandwidth=1e9)
    tc = TokencakeConfig(offload=TimeConfig(default_stall_s=3.0))
    s = Scheduler(SchedulerConfig(), pool, factory, clock, host, cost_model=cost, tokencake=tc)
    (ctx,) = seen
    assert s.policy.ctx is ctx
    assert (ctx.pool, ctx.host_pool, ctx.clock, ctx.cost_model) == (pool, host, clock, cost)
    assert ctx.lifecycle is s.lifecycle and ctx.copies is s.copies and ctx.tokencake is tc
    assert s.lifecycle.config.default_stall_s == 3.0  # the lifecycles use the same settings
    with pytest.raises(AttributeError):
        ctx.pool = BlockPool(9, 16)  # frozen: nothing is swapped in later


def test_registered_policy_can_be_named_in_the_engine_config(monkeypatch):
    with pytest.raises(ValueError, match="unknown policy 'mine'.*vllm"):
        EngineConfig(policy="mine")
    monkeypatch.setitem(policies._REGISTRY, "mine", _Defer)
    assert "mine" in policies.policy_names()
    assert EngineConfig(policy="mine").policy == "mine"
    s = Scheduler(SchedulerConfig(), BlockPool(9, 16), "mine", SimClock())
    assert isinstance(s.policy, _Defer)


def test_engine_config_builds_the_chain():
    cfg = EngineConfig(max_num_seqs=3, max_prefill_chunk=64, max_num_batched_tokens=128,
                       preemption_mode="swap", tokencake={"offload": {"default_stall_s": 2.5}})  # fmt: skip
    assert isinstance(cfg.tokencake, TokencakeConfig)
    assert cfg.tokencake.offload.default_stall_s == 2.5
    sc = cfg.scheduler_config(1000)
    assert sc == SchedulerConfig(3, 128, 64, cfg.max_prefill_seqs, 1000, "swap")
    rc = cfg.runner_config(10, 1000)
    assert (rc.num_pages, rc.max_num_seqs, rc.max_prefill_chunk, rc.max_model_len) == (
        10,
        3,
        64,
        1000,
    )
    assert EngineConfig().tokencake == TokencakeConfig()
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        EngineConfig(tokencake={"bogus": {}})
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        EngineConfig(max_num_seqs=0)  # validated once, by the scheduler's config
