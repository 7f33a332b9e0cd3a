"""Issue 15, bounded inputs in the library layer: regressions for findings 1, 2, 3 and 6.

These hold without the HTTP server (``LLMEngine.add_request``, ``Scheduler.lifecycle_event``,
``SamplingParams``), so a caller bypassing the server gets the same bounds.
"""

from __future__ import annotations

import math
import sys
import uuid

import pytest

from tokencake.memory.block_pool import BlockPool
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.agent_scores import AgentHistory, TypeStats
from tokencake.scheduler.bounded import ByteLRU
from tokencake.scheduler.core import Scheduler, SchedulerConfig
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.metadata import AgentMetadata, is_canonical_lifecycle_id
from tokencake.scheduler.predictor import DurationPredictor
from tokencake.scheduler.request import Request, RequestStatus
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step
from tokencake.scheduler.tokencake_config import SpaceConfig, TokencakeConfig


# ---- finding 1: out-of-range metadata is refused, naming the field -------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("importance", 1e308),
        ("memory_weight", 1e308),
        ("similarity", 5e-324),
        ("depth", 10**400),
        ("depth", 9 * 10**306),
        ("importance", 10**400),
        ("application_started_at_s", 10**400),
        ("application_elapsed_s", math.inf),
        ("fanout_width", 0),
        ("in_degree", 1_000_001),
        ("similarity", math.nan),
    ],
)
def test_out_of_range_metadata_names_the_field(field, value):
    with pytest.raises(RequestRejected) as info:
        AgentMetadata.from_dict({field: value})
    assert info.value.param == f"metadata.{field}" and field in str(info.value)


def test_metadata_bounds_are_inclusive_and_ints_accepted_for_floats():
    m = AgentMetadata.from_dict(
        {
            "importance": 10**6,
            "depth": 10**6,
            "application_max_depth": 10**6,
            "similarity": 1e-6,
            "application_started_at_s": 1e10,
            "memory_weight": 0,
        }  # fmt: skip
    )
    assert m.importance == 10**6 and m.similarity == 1e-6


def test_engine_refuses_bad_metadata_before_queueing(make_engine):
    engine = make_engine(policy="tokencake")
    with pytest.raises(RequestRejected, match="importance"):
        engine.add_request("hi", SamplingParams(max_tokens=2), metadata={"importance": 1e308})
    assert not engine.has_unfinished_requests() and not engine._text


@pytest.mark.parametrize(
    "kw,param",
    [
        (dict(temperature=10**400), "temperature"),
        (dict(top_p=10**400), "top_p"),
        (dict(temperature=math.nan), "temperature"),
        (dict(max_tokens=10**400), "max_tokens"),
        (dict(stop=["x" * 1025]), "stop"),
        (dict(stop=["a"] * 17), "stop"),
        (dict(stop_token_ids=[2**31]), "stop_token_ids"),
    ],
)
def test_sampling_params_bounded_without_overflow(kw, param):
    with pytest.raises(RequestRejected) as info:
        SamplingParams(**kw)
    assert info.value.param == param


# ---- finding 2: a type's history never holds a non-finite value ----------------------------------
def _sched(tokencake=None):
    clock = SimClock()
    pool = BlockPool(80, 16)
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_prefill_chunk=64,
                          max_model_len=256)  # fmt: skip
    return (
        Scheduler(cfg, pool, "tokencake", clock, tokencake=tokencake),
        SimExecutor(clock),
        clock,
    )


def test_poisoning_a_type_is_refused_at_the_door():
    """Thirty 'poisontype' requests with depth 9*10**306 are all refused; afterwards a normal
    request of that type runs through a repartition."""
    s, ex, clock = _sched()
    for i in range(30):
        with pytest.raises(RequestRejected, match="depth"):
            s.add_request(Request(f"p{i}", [1, 2, 3], 2, clock(),
                                  metadata={"agent_type": "poisontype", "depth": 9 * 10**306}))  # fmt: skip
    r = Request("ok", [5, 6, 7], 2, clock(), metadata={"agent_type": "poisontype", "depth": 1})
    s.add_request(r)
    s.policy.space.repartition(clock(), [], [r])
    while s.has_work:
        sim_step(s, ex)
    assert r.status is RequestStatus.FINISHED_LENGTH


def test_history_refuses_non_finite_updates_and_resets_a_poisoned_type():
    h = AgentHistory()
    m = AgentMetadata(agent_type="t", depth=3)
    req = Request("a", [1, 2], 2, 0.0, metadata=m)
    h.on_admit("t", req, m, 0.0)
    bad = AgentMetadata(agent_type="t")
    object.__setattr__(bad, "depth", 1e308)  # bypassing validation
    h.on_admit("t", req, bad, 0.0)  # 3 + 1e308 is finite: accepted
    object.__setattr__(bad, "depth", math.inf)
    with pytest.raises(ValueError, match="depth"):
        h.on_admit("t", req, bad, 0.0)
    assert all(math.isfinite(v) for v in vars(h.stats.peek("t")).values())
    # Poison it directly: the score resets the type instead of failing every step.
    h.stats.peek("t").depth = math.nan
    assert math.isfinite(h.score("t", 1.0, 0.0, 1)) and h.resets == 1
    assert h.stats.peek("t") == TypeStats()


def test_predictor_never_holds_non_finite_values():
    p = DurationPredictor()
    for bad in (math.nan, math.inf, -1.0):
        p.learn("t", "", "k", bad)
    assert p.history(p.key("t", "", "k")) is None
    p.learn("t", "", "k", 2.0)
    assert p.predict("t", "", "k", math.nan) == 2.0  # a non-finite estimate is ignored
    assert p.predict("t", "", "k", math.inf) == 2.0


# ---- finding 3: events and ids -----------------------------------------------------------------
def test_lifecycle_id_with_trailing_newline_is_refused():
    lid = "tc-" + uuid.uuid4().hex
    assert is_canonical_lifecycle_id(lid) and not is_canonical_lifecycle_id(lid + "\n")
    with pytest.raises(RequestRejected, match="lifecycle_id"):
        AgentMetadata.from_dict({"lifecycle_id": lid + "\n"}, strict_lifecycle_id=True)
    with pytest.raises(RequestRejected, match="lifecycle_id"):
        AgentMetadata.from_dict({"lifecycle_id": "x\n"})  # in-process ids: no control chars


def test_request_ids_are_bounded(make_engine):
    engine = make_engine()
    for rid in ("a\n", "x" * 129, ""):
        with pytest.raises(RequestRejected, match="request_id"):
            engine.add_request("hi", SamplingParams(max_tokens=1), request_id=rid or "\x00")
    assert not engine._text


@pytest.mark.parametrize(
    "event,param",
    [
        ({"estimated_duration_s": 10**400}, "estimated_duration_s"),
        ({"estimated_duration_s": 1e7}, "estimated_duration_s"),
        ({"estimated_duration_s": math.nan}, "estimated_duration_s"),
        ({"kind": "k" * 257}, "kind"),
        ({"lifecycle_id": "x" * 129}, "lifecycle_id"),
        ({"lifecycle_id": "abc\n"}, "lifecycle_id"),
    ],
)
def test_bad_events_are_invalid_and_name_the_field(event, param):
    s, _, _ = _sched()
    body = {"event": "stall_started", "lifecycle_id": "abc", **event}
    disp, out = s.lifecycle_event(body)
    assert disp.http_status == 400 and out["param"] == param
    assert out["lifecycle_id"] in ("abc", None)  # a bad id is never echoed


# ---- finding 6: caches bounded by bytes, history expires ----------------------------------------
def test_byte_lru_bounds_bytes_and_expires():
    c: ByteLRU[str, int] = ByteLRU(max_bytes=64 * 1024, ttl_s=10.0)
    for i in range(200):
        c.put(f"{i}" + "x" * 4000, i, now=float(i) * 0.01)
        assert c.nbytes <= 64 * 1024
    assert 0 < len(c) < 20 and c.nbytes == sum(
        sys.getsizeof(k) + 512 for k in c
    )  # only the most recent survive
    c.expire(now=100.0)
    assert len(c) == 0 and c.nbytes == 0


def test_type_strings_are_length_bounded_and_history_is_bounded_by_bytes():
    with pytest.raises(RequestRejected, match="agent_type"):
        AgentMetadata.from_dict({"agent_type": "x" * (4 * 2**20)})
    with pytest.raises(RequestRejected, match="join_group"):
        AgentMetadata.from_dict({"join_group": "x" * 257})
    h = AgentHistory(limit=4096, max_bytes=256 * 1024)
    for i in range(4096):
        h.get(f"{i:04d}" + "y" * 252)
    assert h.stats.nbytes <= 256 * 1024 and len(h.stats) < 4096


def test_agent_type_history_expires():
    cfg = TokencakeConfig(scheduling=SpaceConfig(history_ttl_s=5.0))
    s, ex, clock = _sched(cfg)
    s.add_request(Request("a", [1, 2, 3], 2, clock(), metadata={"agent_type": "old"}))
    while s.has_work:
        sim_step(s, ex)
    hist = s.policy.space.history
    assert "old" in hist.stats
    clock.advance(6.0)
    s.add_request(Request("b", [4, 5, 6], 2, clock(), metadata={"agent_type": "new"}))
    while s.has_work:
        sim_step(s, ex)
    assert "old" not in hist.stats and "new" in hist.stats


def test_unknown_metadata_keys_keep_only_small_scalars():
    m = AgentMetadata.from_dict({"note": "x" * 10_000, "n": 3, "deep": {"a": [1] * 1000},
                                 **{f"k{i}": i for i in range(100)}})  # fmt: skip
    assert "note" not in m.extra and "deep" not in m.extra and m.extra["n"] == 3
    assert len(m.extra) <= 32
