"""The Time Scheduler end to end on the real engine (tiny random model, real KV copies).

One agent's LLM call finishes, its tool call starts (``stall_started`` with an estimate) while
the pool is under pressure; the policy offloads the agent's prefix to the host tier, uploads it
before the predicted return and the successor (previous prompt + output + tool result) hits it
on the device. Also: the keep (TTL pin) path, and mispredicted tools (early return, return while
the copy-out is in flight, overrun, safety expiry). Every run checks greedy outputs against an
unpressured ``vllm`` run, both pools' integrity, and that nothing is held once all is done.

A :class:`SimClock` drives the scheduler and the lifecycles, so the tool durations are simulated
seconds and the tests do not sleep; the KV copies themselves are real.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.conftest import TINY_ENGINE, lively_params
from tests.helpers.copies import defer_copies
from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.models.config import tiny_config
from tokencake.models.tokenizer import Tokenizer
from tokencake.outputs import RequestOutput
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.sim_executor import SimClock
from tokencake.scheduler.time_sched import PState, TimeScheduler
from tokencake.scheduler.tokencake_policy import TokencakePolicy

DT = 0.02  # simulated seconds per engine step
BS = TINY_ENGINE["page_size"]
# The scheduled offload path: with ``offload.write_back_all`` (the default) a finished agent's
# blocks are copied to the host tier as it finishes, so there is nothing left to offload when its
# tool starts; these tests switch write-back off to exercise the Time Scheduler's own copies, and
# switch the selective OFFLOAD action on (off by default since issue 12: it did not pay).
TC = "tokencake-scheduled-offload"
#: test policy name -> (registered policy, ``EngineConfig.tokencake`` override)
POLICY_CONFIGS = {
    TC: ("tokencake", {"offload": {"write_back_all": False, "selective_offload": True}}),
}
AGENT = dict(agent_type="planner", offload_eligible=True, reusable_prefix=True)
TOOL_RESULT = [5, 6, 7, 8, 9, 10]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


_rng = random.Random(0)
PROMPT_A = [_rng.randrange(3, 256) for _ in range(100)]  # the agent: 6 full blocks + 8 tokens
PROMPT_B = [_rng.randrange(3, 256) for _ in range(100)]  # the request that wants A's memory
PROMPT_D = [_rng.randrange(3, 256) for _ in range(216)]  # background load: usage >= 60%


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return cfg, lively_params(cfg), Tokenizer.byte_level_for_tests()


@dataclass
class Run:
    """One scripted agent turn on one engine, with everything the assertions look at."""

    engine: LLMEngine
    clock: SimClock
    outs: dict[str, RequestOutput] = field(default_factory=dict)
    copies: list[tuple[str, int, str]] = field(default_factory=list)  # (direction, blocks, tag)
    states: list[tuple[float, str]] = field(default_factory=list)  # A's preservation states
    t_start: float = 0.0

    @property
    def ts(self):
        return self.engine.scheduler.policy.time

    def step(self) -> None:
        for o in self.engine.step():
            if o.finished:
                self.outs[o.request_id] = o
        ts = _time_scheduler(self.engine)
        p = ts.items.get("A") if ts is not None else None
        if p is not None and (not self.states or self.states[-1][1] != p.state.value):
            self.states.append((self.clock(), p.state.value))
        self.clock.advance(DT)

    def step_until(self, cond: Callable[[], bool], limit: int = 10_000) -> None:
        for _ in range(limit):
            if cond():
                return
            self.step()
        raise AssertionError("condition not reached")

    def event(self, name: str, **kw) -> dict:
        disp, body = self.engine.lifecycle_event({"event": name, "lifecycle_id": "A", **kw})
        assert disp.http_status == 200, body
        return body

    def successor(self) -> None:
        prompt = PROMPT_A + self.outs["A"].token_ids + TOOL_RESULT
        self.engine.add_request(prompt, _greedy(8), "A2", dict(agent_type="planner"))

    def drain(self) -> None:
        self.step_until(lambda: not self.engine.has_unfinished_requests())
        for _ in range(3):  # let the Time Scheduler settle the finished lifecycle
            self.step()


def _engine(model, policy: str, pressure: bool = True, tp: int = 1) -> tuple[LLMEngine, SimClock]:
    cfg, params, tok = model
    clock = SimClock(100.0)
    name, tokencake = POLICY_CONFIGS.get(policy, (policy, None))
    over = dict(policy=name, tensor_parallel_size=tp)
    if tokencake is not None:
        over["tokencake"] = tokencake
    if pressure:  # 22 usable blocks: D (14) + A (7) fill the pool; B needs A's 7
        over.update(num_pages=23, host_kv_gib=0.001)
    eng = LLMEngine(EngineConfig(**{**TINY_ENGINE, **over}), model_config=cfg, params=params,
                    tokenizer=tok, clock=clock)  # fmt: skip
    return eng, clock


def _record_copies(run: Run) -> None:
    tr = run.engine.transfer
    if tr is None:
        return
    issue = tr.issue

    def logged(direction, device_blocks, host_blocks, tag=""):
        run.copies.append((direction, len(device_blocks), tag))
        return issue(direction, device_blocks, host_blocks, tag)

    tr.issue = logged


def _start_turn(model, policy: str, estimate: float, pressure: bool = True, tp: int = 1) -> Run:
    """D (background) and agent A run; A finishes and starts a tool; B arrives and wants the
    memory A's cached blocks occupy (``tp``: tensor-parallel size; tp_host_check.py uses it)."""
    eng, clock = _engine(model, policy, pressure, tp)
    run = Run(eng, clock)
    _record_copies(run)
    eng.add_request(PROMPT_D, _greedy(20), "D")
    eng.add_request(PROMPT_A, _greedy(8), "A", AGENT)
    run.step_until(lambda: "A" in run.outs)
    run.t_start = clock()
    body = run.event("stall_started", kind="tool", estimated_duration_s=estimate)
    assert body["state"] == "active"
    eng.add_request(PROMPT_B, _greedy(8), "B")
    return run


def _finish_turn(run: Run) -> None:
    run.successor()
    run.drain()


def _time_scheduler(engine: LLMEngine) -> TimeScheduler | None:
    """The engine policy's Time Scheduler (None for a policy without one)."""
    pol = engine.scheduler.policy
    return pol.time if isinstance(pol, TokencakePolicy) else None


def _check_clean(run: Run) -> None:
    """Both pools intact; no pin, retention, copy or fence left once every request ended."""
    eng = run.engine
    eng.pool.check_integrity()
    assert not eng.has_unfinished_requests()
    assert eng.scheduler.copies.in_flight == 0
    ts = _time_scheduler(eng)
    if ts is not None:
        assert ts.stalled_blocks == 0
        assert all(not p.pins and not p.host_retained for p in ts.items.values())
        assert "A" not in ts.items  # the finished lifecycle was settled and forgotten
    if eng.host_pool is not None:
        eng.host_pool.check_integrity()
        assert eng.host_pool.num_retained == 0
        assert eng.host_pool.num_pending == 0
        assert not eng.transfer.in_flight and not eng.scheduler.copies.fenced_blocks()
        assert eng.transfer.failed == 0
    eng.pool.evict_cached()
    assert eng.pool.num_free == eng.pool.capacity and eng.pool.num_cached == 0


@pytest.fixture(scope="module")
def reference(model) -> dict[str, list[int]]:
    """Greedy outputs with no memory pressure, no host tier and the vllm policy."""
    run = _start_turn(model, "vllm", 3.0, pressure=False)
    run.step_until(lambda: "B" in run.outs and "D" in run.outs)
    run.event("stall_finished")
    _finish_turn(run)
    _check_clean(run)
    assert run.outs["A2"].num_cached_tokens == 6 * BS  # ample pool: A's prefix survived
    return {k: o.token_ids for k, o in run.outs.items()}


def _outputs(run: Run) -> dict[str, list[int]]:
    return {k: o.token_ids for k, o in run.outs.items()}


def _tc_copies(run: Run, direction: str) -> int:
    return sum(n for d, n, tag in run.copies if d == direction and tag.startswith("tc-"))


# ---- the paper's path: offload under pressure, predictive upload, device hit ------------------------
def test_offload_and_predictive_upload_on_real_engine(model, reference):
    run = _start_turn(model, TC, 3.0)
    ts = run.ts
    run.step_until(lambda: ts.items["A"].state is PState.OFFLOADED)
    p = ts.items["A"]
    assert ts.counters.get("selected") == 1 and ts.counters.get("offloads") == 1
    assert p.n_restore == 6 and len(p.host_retained) == 6  # A's whole computed prefix
    assert _tc_copies(run, "d2h") == 6 and ts.copy_blocks["d2h"] == 6
    assert run.engine.host_pool.num_retained == 6
    predicted_end = p.rec.predicted_end
    # Tool runs exactly as long as predicted; keep stepping (the engine ticks while idle).
    run.step_until(lambda: run.clock() >= run.t_start + 3.0)
    restored = [t for t, s in run.states if s == "restored"]
    assert restored and restored[0] < predicted_end, run.states  # back before the return
    assert ts.counters.get("uploads") == 1 and ts.copy_blocks["h2d"] >= 1
    assert ts.items["A"].state is PState.RESTORED and len(ts.items["A"].pins) == 6
    run.event("stall_finished")
    n_copies = len(run.copies)
    _finish_turn(run)
    # The successor hit all six blocks on the device: no copy-in of its own was needed.
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert len(run.copies) == n_copies
    assert _outputs(run) == reference
    _check_clean(run)

    # The same schedule under vllm: B overwrote A's cached blocks, A2 recomputes its prefix.
    base = _start_turn(model, "vllm", 3.0)
    base.step_until(lambda: base.clock() >= base.t_start + 3.0)
    base.event("stall_finished")
    _finish_turn(base)
    assert _outputs(base) == reference
    assert base.outs["A2"].num_cached_tokens < run.outs["A2"].num_cached_tokens
    _check_clean(base)


# ---- keep (TTL pin) ---------------------------------------------------------------------------------
def _alone(model, estimate: float) -> Run:
    """Agent A alone with a host tier and no queue: no pressure, so the policy keeps."""
    eng, clock = _engine(model, TC)
    run = Run(eng, clock)
    _record_copies(run)
    eng.add_request(PROMPT_A, _greedy(8), "A", AGENT)
    run.step_until(lambda: "A" in run.outs)
    run.t_start = clock()
    run.event("stall_started", kind="tool", estimated_duration_s=estimate)
    return run


def test_keep_pins_until_the_successor_takes_them(model, reference):
    run = _alone(model, 1.0)
    ts = run.ts
    run.step()
    p = ts.items["A"]
    assert p.state is PState.KEPT and ts.counters.get("action_keep") == 1
    assert ts.stalled_blocks == 6 and all(run.engine.pool.ref_count(b) == 1 for b in p.pins)
    assert p.ttl == pytest.approx(run.t_start + 1.5 * 1.0, abs=3 * DT)  # keep_ttl_factor
    run.step_until(lambda: run.clock() >= run.t_start + 0.5)
    assert ts.items["A"].state is PState.KEPT
    run.event("stall_finished")
    _finish_turn(run)
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert run.outs["A2"].token_ids == reference["A2"]
    assert not run.copies  # keeping needs no copies
    _check_clean(run)


def test_keep_ttl_releases_an_overrunning_tool(model, reference):
    run = _alone(model, 1.0)
    ts = run.ts
    run.step()
    assert ts.items["A"].state is PState.KEPT
    ttl = ts.items["A"].ttl
    # The tool runs far longer than predicted: the pin goes at the TTL and stays gone.
    run.step_until(lambda: run.clock() >= ttl + 2.0)
    assert ts.counters.get("ttl_expired") == 1
    assert ts.items["A"].state is PState.DROPPED and ts.stalled_blocks == 0
    run.step_until(lambda: run.clock() >= ttl + 10.0)
    assert ts.stalled_blocks == 0, "re-pinned after the TTL expired"
    run.event("stall_finished")
    _finish_turn(run)
    assert run.outs["A2"].token_ids == reference["A2"]
    _check_clean(run)


# ---- mispredicted tools -----------------------------------------------------------------------------
def test_early_return_hurries_the_upload(model, reference):
    run = _start_turn(model, TC, 3.0)
    ts = run.ts
    run.step_until(lambda: ts.items["A"].state is PState.OFFLOADED)
    run.step_until(lambda: run.clock() >= run.t_start + 0.8)
    assert ts.items["A"].state is PState.OFFLOADED  # the planned upload is ~2 s away
    run.event("stall_finished")  # the tool returns 2.2 s early
    run.successor()
    run.step()  # the tick uploads at once; the successor waits for the landing
    assert ts.counters.get("uploads") == 1
    run.drain()
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert _outputs(run) == reference
    _check_clean(run)


def test_return_while_the_copy_out_is_in_flight(model, reference):
    run = _start_turn(model, TC, 3.0)
    ts = run.ts
    _, release = defer_copies(run.engine.transfer, "d2h")
    run.step_until(lambda: ts.items["A"].state is PState.OFFLOADING)
    run.step()
    assert ts.items["A"].state is PState.OFFLOADING  # not landed: nothing reported
    run.event("stall_finished")  # before the d2h has landed
    release()
    del run.engine.transfer._dispatch  # later copies run normally
    run.successor()
    run.drain()
    assert ts.counters.get("offloads") == 1
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert _outputs(run) == reference
    _check_clean(run)


def test_finish_without_successor_gives_everything_back(model, reference):
    run = _start_turn(model, TC, 3.0)
    ts = run.ts
    run.step_until(lambda: ts.items.get("A") is not None and ts.items["A"].state is PState.RESTORED)
    run.event("stall_finished")
    # No successor comes: the pins last the hand-off grace, then pins and retention go.
    run.step_until(lambda: "A" not in ts.items)
    assert run.clock() >= run.t_start + 3.0 + ts.cfg.handoff_grace_s - 1.0
    assert ts.stalled_blocks == 0 and run.engine.host_pool.num_retained == 0
    run.drain()
    run.successor()  # late: it still hits whatever survived, with identical outputs
    run.drain()
    assert _outputs(run) == reference
    _check_clean(run)


def test_overrun_releases_the_restore_then_uploads_again(model, reference):
    run = _start_turn(model, TC, 3.0)
    ts = run.ts
    run.step_until(lambda: ts.items["A"].state is PState.RESTORED)
    end = ts.items["A"].rec.predicted_end
    run.step_until(lambda: run.clock() >= end + ts.cfg.overrun_grace_s + 0.1)
    assert ts.counters.get("overrun_released") == 1
    p = ts.items["A"]
    assert p.state is PState.OFFLOADED and not p.pins and len(p.host_retained) == 6
    run.step_until(lambda: run.clock() >= end + 3.0)
    run.event("stall_finished")
    run.successor()
    run.drain()
    assert ts.counters.get("uploads") == 2
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert _outputs(run) == reference
    _check_clean(run)


def test_safety_deadline_expires_the_lifecycle(model, reference):
    run = _start_turn(model, TC, 3.0)
    ts = run.ts
    run.step_until(lambda: ts.items["A"].state is PState.OFFLOADED)
    run.step_until(lambda: "B" in run.outs and "D" in run.outs)
    run.clock.advance(61.0)  # past clamp(4 x 3 s, 60 s, 1 h) from the start
    run.step()
    assert "A" not in ts.items and run.engine.host_pool.num_retained == 0
    assert ts.stalled_blocks == 0
    assert run.event("stall_finished")["disposition"] == "late_finish"
    run.successor()
    run.drain()
    # Unretained host blocks stay in the host LRU: the successor still restores from there.
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert _outputs(run) == reference
    _check_clean(run)


def test_idle_engine_steps_for_the_predictive_upload(model, reference):
    """A driver that steps only while requests are unfinished (as ``AsyncEngine`` does) must
    still step when the upload is due, while every agent waits on its tool."""
    run = _start_turn(model, TC, 3.0)
    ts = run.ts
    eng = run.engine
    run.step_until(lambda: ts.items["A"].state is PState.OFFLOADED)
    run.step_until(lambda: not eng.has_unfinished_requests())
    upload_at = ts.items["A"].upload_at
    assert eng.seconds_until_timer() == pytest.approx(upload_at - run.clock())
    idle_steps = 0
    while run.clock() < run.t_start + 3.0:  # the AsyncEngine loop, on the simulated clock
        due = eng.seconds_until_timer()
        if not eng.has_unfinished_requests() and due > 0:
            run.clock.advance(min(0.05, due))
            continue
        idle_steps += 1
        run.step()
    assert ts.items["A"].state is PState.RESTORED
    assert idle_steps <= 5  # woke for the upload and its landing, no busy loop
    run.event("stall_finished")
    _finish_turn(run)
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert _outputs(run) == reference
    _check_clean(run)
    assert eng.seconds_until_timer() > 30  # only lifecycle tombstones remain


# ---- the default: write-back of every finished block ------------------------------------------------
def test_default_write_back_serves_the_return_from_either_tier(model, reference):
    """Default ``tokencake`` (write-back on): A's blocks reach the host tier as A finishes, so B
    may take A's device blocks without a scheduled offload, and A2 still hits A's whole prefix
    (on the device or through a copy-in from the host)."""
    run = _start_turn(model, "tokencake", 3.0)
    assert _tc_copies(run, "d2h") == 0  # nothing scheduled by the Time Scheduler yet
    run.step_until(lambda: "B" in run.outs and "D" in run.outs)
    assert sum(n for d, n, _ in run.copies if d == "d2h") >= 6  # A's written-back blocks
    run.step_until(lambda: run.clock() >= run.t_start + 3.0)
    run.event("stall_finished")
    _finish_turn(run)
    assert run.outs["A2"].num_cached_tokens == 6 * BS
    assert _outputs(run) == reference
    _check_clean(run)


def test_running_requests_short_of_a_block_unpin_a_kept_agent(model):
    """Agent A's 6 blocks are pinned for its tool call (KEEP). E and F then run: their
    prompts fit beside the pins, their decodes outgrow the rest of the pool. They take A's
    pinned blocks instead of preempting one of them (they used to: a running request's KV
    left the device while A's, which nothing reads until its tool returns, stayed)."""
    eng, clock = _engine(model, "tokencake")
    run = Run(eng, clock)
    eng.add_request(PROMPT_A, _greedy(8), "A", AGENT)
    run.step_until(lambda: "A" in run.outs)
    run.event("stall_started", kind="tool", estimated_duration_s=5.0)
    run.step()
    ts = run.ts
    assert ts.items["A"].state is PState.KEPT and ts.stalled_blocks == 6
    rng = random.Random(1)
    prompts = {"E": [rng.randrange(3, 256) for _ in range(8 * BS)],
               "F": [rng.randrange(3, 256) for _ in range(5 * BS)]}  # fmt: skip
    for rid, prompt in prompts.items():  # 9 + 6 blocks to start, 11 + 8 at the end: 19 > 16
        eng.add_request(prompt, _greedy(3 * BS), rid)
    run.step_until(lambda: "E" in run.outs and "F" in run.outs)
    assert eng.scheduler.num_preemptions == 0
    assert ts.items["A"].state is PState.DROPPED and ts.stalled_blocks == 0
    assert ts.counters.get("growth_released_blocks") == 6
    solo, solo_clock = _engine(model, "vllm", pressure=False)
    alone = Run(solo, solo_clock)
    for rid, prompt in prompts.items():
        solo.add_request(prompt, _greedy(3 * BS), rid)
    alone.step_until(lambda: "E" in alone.outs and "F" in alone.outs)
    assert {k: run.outs[k].token_ids for k in prompts} == _outputs(alone)
    run.event("stall_finished")
    _finish_turn(run)
    _check_clean(run)
