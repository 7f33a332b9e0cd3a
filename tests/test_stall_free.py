"""Stall-free prefill (scheduler/stall_free.py): while decode rows run, a step carries only the
prefill tokens that fit under its cost floor; outputs never change."""

from __future__ import annotations

from tests.test_engine import GREEDY, PROMPTS, run_batch, run_solo
from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.scheduler.core import Scheduler, SchedulerConfig
from tokencake.scheduler.request import Request
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, sim_step
from tokencake.scheduler.stall_free import capped_chunk, stall_free_cap


def _cost(room: int) -> CostModel:
    """A cost model whose floor leaves ``room`` free tokens for a step of no rows (powers of
    two, so the arithmetic is exact): ``a`` = 1/64 s, ``b`` = 1/1024 s per token."""
    cm = CostModel(bytes_per_block=1024)
    cm.recompute_a, cm.recompute_b, cm.recompute_c = 1 / 64, 1 / 1024, 0.0
    cm.step_floor_s = 1 / 64 + room / 1024
    return cm


def test_free_prefill_tokens_by_hand():
    cm = _cost(200)
    assert cm.free_prefill_tokens(3, 0) == 197  # 200 tokens of room, 3 taken by the rows
    cm.step_floor_ctx_s = 1 / (1024 * 8)  # every 8 context tokens read add one token of room
    assert cm.free_prefill_tokens(3, 80) == 207
    assert cm.free_prefill_tokens(250, 0) == 0  # compute-bound: the rows alone exceed it
    assert CostModel(bytes_per_block=1024).free_prefill_tokens(1, 0) == 0  # floor unmeasured
    # The CPU engine's shape: a prefill call's fixed cost is above a one-row step's, no room.
    cpu = CostModel(bytes_per_block=1024, recompute_a=0.13, recompute_b=0.0025)
    cpu.step_floor_s = 0.041
    assert cpu.free_prefill_tokens(1, 200) == 0


def _req(rid: str, prompt: int, max_tokens: int, computed: int = 0, out: int = 0) -> Request:
    base = 1000 * (ord(rid[0]) + len(rid))
    r = Request(rid, [base + i for i in range(prompt)], max_tokens, 0.0)
    r.num_computed_tokens = computed
    r.output_token_ids = list(range(1, out + 1))
    return r


def test_cap_counts_decode_rows_and_needs_a_block_of_room():
    cm = _cost(40)
    decoding = [_req("a", 10, 50, computed=12, out=3), _req("b", 20, 50, computed=21, out=2)]
    prefilling = _req("p", 300, 10, computed=64)
    assert stall_free_cap(cm, [prefilling], 16) is None  # no decode row: nothing stalls
    assert stall_free_cap(cm, [prefilling, *decoding], 16) == 38  # 40 - 2 decode rows
    assert stall_free_cap(_cost(17), [prefilling, *decoding], 16) is None  # 15 < one block
    assert stall_free_cap(CostModel(bytes_per_block=1024), decoding, 16) is None  # unmeasured


def _chunks(
    policy: str, cost: CostModel | None = None, n_steps: int = 12
) -> list[list[tuple[str, int]]]:
    """A (32-token prompt, 60 outputs) starts alone; B (300 tokens) arrives once A decodes.
    The cost floor (default) leaves 64 tokens of room. Returns each step's (request, tokens)
    chunks."""
    clock = SimClock()
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_prefill_chunk=256,
                          max_prefill_seqs=4, max_model_len=512)  # fmt: skip
    s = Scheduler(cfg, BlockPool(65, 16), policy, clock, cost_model=cost or _cost(64))
    ex = SimExecutor(clock)
    md = {"agent_type": "coder", "importance": 1.0, "depth": 1}
    s.add_request(Request("a", list(range(100, 132)), 60, 0.0, metadata=md))
    steps = []
    for i in range(n_steps):
        if i == 2:
            s.add_request(Request("b", list(range(5000, 5300)), 4, clock(), metadata=md))
        plan, _ = sim_step(s, ex)
        steps.append([(c.request.request_id, c.num_tokens) for c in plan.chunks])
    return steps


def test_a_long_prompt_rides_in_the_decode_steps_room():
    on = _chunks("tokencake")
    assert on[0] == [("a", 32)]  # A's prompt alone: no decode row, the whole chunk
    # B's 300 tokens beside A's decode row: 64 - 1 = 63 a step, then the remainder.
    assert [dict(s).get("b") for s in on[2:7]] == [63, 63, 63, 63, 48]
    assert all(dict(s).get("a") == 1 for s in on[1:7])  # A decodes in every one of them
    # Switched off (and for vLLM, which has no cap): B's prompt in budget-sized chunks.
    for policy in ("tokencake-no-stall-free-prefill", "vllm"):
        off = _chunks(policy)
        assert [dict(s).get("b") for s in off[2:4]] == [256, 44], policy


def test_engine_outputs_do_not_change(make_engine):
    """Greedy outputs of a batch whose long prompts prefill beside decoding rows, with a cost
    floor that caps those chunks at ~20 tokens, equal each prompt run alone uncapped."""
    solo = run_solo(make_engine(enable_prefix_cache=False), PROMPTS)
    engine = make_engine(policy="tokencake")
    cost = engine.scheduler.policy.ctx.cost_model
    tuned = _cost(24)
    cost.recompute_a, cost.recompute_b, cost.recompute_c = 1 / 64, 1 / 1024, 0.0
    cost.step_floor_s = tuned.step_floor_s
    policy = engine.scheduler.policy
    caps: list[int | None] = []
    original = policy.prefill_cap
    policy.prefill_cap = lambda running: caps.append(original(running)) or caps[-1]
    assert run_batch(engine, PROMPTS, GREEDY) == solo
    assert any(c is not None and 16 <= c < 24 for c in caps)  # capped steps did happen


def test_engine_warmup_measures_the_floor(make_engine):
    """Warm-up times the one-row floor beside the prefill fit, into the cost model the policy
    reads (the tiny model's room depends on this machine, so only its presence is checked)."""
    engine = make_engine(policy="tokencake", warmup=True, max_num_seqs=4, max_model_len=128)
    cost = engine.scheduler.policy.ctx.cost_model
    assert cost is engine.cost_model
    assert cost.step_floor_s > 0  # (the prefill fit may clip b to 0 on the tiny model: noise)
    assert engine.scheduler.policy.prefill_cap([]) is None  # no decode row: no cap


def test_prefill_in_room_prices_the_attention_by_hand():
    cm = _cost(100)
    assert cm.prefill_in_room(100, 5000, 300) == (100, 100)  # c = 0: the bare room
    assert cm.prefill_in_room(100, 0, 40) == (40, 40)
    cm.recompute_c = 1 / (1024 * 64)  # attending 64 context tokens costs one token of compute
    # context 0: n + n^2 / 128 <= 100 -> 65 tokens use 65 * (1 + 32.5 / 64) = 98.01 -> 99
    assert cm.prefill_in_room(100, 0, 300) == (65, 99)
    # context 640: n * (11 + n / 128) <= 100 -> 9 tokens use 99.6 -> 100
    assert cm.prefill_in_room(100, 640, 300) == (9, 100)
    assert cm.prefill_in_room(100, 640, 4) == (4, 45)  # 4 * (11 + 1/32) = 44.1
    assert cm.prefill_in_room(10, 6400, 300) == (0, 0)  # one token would use 101
    assert cm.prefill_in_room(0, 0, 300) == (0, 0)


def test_the_first_capped_chunk_gets_at_least_a_block_by_hand():
    cm = _cost(100)
    cm.recompute_c = 1 / (1024 * 64)  # attending 64 context tokens costs one token of compute
    assert capped_chunk(cm, 100, 16, 100, 0, 300) == (65, 99)  # as prefill_in_room
    # 9 tokens fit beside 640 cached, 0 beside 6,400: the room untouched, a block runs anyway
    assert capped_chunk(cm, 100, 16, 100, 640, 300) == (16, 100)
    assert capped_chunk(cm, 100, 16, 100, 6400, 300) == (16, 100)
    assert capped_chunk(cm, 100, 16, 100, 6400, 5) == (5, 100)  # all that is left
    # Another chunk already took some of the room: no guarantee for this one.
    assert capped_chunk(cm, 100, 16, 50, 640, 300) == (4, 45)
    assert capped_chunk(cm, 100, 16, 50, 6400, 300) == (0, 0)


def test_a_prompt_whose_attention_fills_the_room_still_advances():
    """Attention priced at one token of compute per context token: B's chunks beside A's
    decode row would shrink to a token a step (10, 4, 3, 3, 2, ...) and stop at 63 tokens of
    context, for as long as A decodes. With the guarantee B advances a block a step."""
    cost = _cost(64)
    cost.recompute_c = 1 / 1024
    steps = _chunks("tokencake", cost, 24)
    assert [dict(s).get("b") for s in steps[2:21]] == [16] * 18 + [12]  # 300 tokens
    assert all(dict(s).get("a") == 1 for s in steps[1:24])  # A decodes in every step


def test_capped_chunks_shrink_as_their_context_grows():
    """With attention priced (one token of compute per 64 attended), B's chunks beside A's
    decode row get smaller as B's own context grows: 46 tokens use 46 * (1 + 23 / 64) = 62.5
    of the 63 of room, then 32 after 46 use 32 * (1 + 62 / 64) = 63.0."""
    cost = _cost(64)
    cost.recompute_c = 1 / (1024 * 64)
    b_chunks = [n for step in _chunks("tokencake", cost, 40) for rid, n in step if rid == "b"]
    assert b_chunks[:2] == [46, 32]
    prefill = b_chunks[: b_chunks.index(1)] if 1 in b_chunks else b_chunks
    assert sum(prefill) == 300
    assert all(x >= y for x, y in zip(prefill, prefill[1:], strict=False))


def test_capped_steps_stay_under_their_floor_on_the_a800_preset(monkeypatch):
    """Independent check against the simulator's roofline step model: every step that the
    cap limited costs no more than its floor (overhead + weight read + the rows' KV reads),
    long deep-research contexts included, so the decoding rows never wait on prefill."""
    import bench.driver
    from bench.generators import deep_research
    from bench.presets import make_preset
    from bench.run import run_sim

    preset = make_preset("a800-qwen2.5-14b")
    step = preset.step
    checked: list[tuple[float, float]] = []
    init = bench.driver.SimBackend.__init__

    def watched(be, *args, **kwargs):
        """The backend, with each step's cap and plan recorded."""
        init(be, *args, **kwargs)
        plan_fn, cap_fn = be.loop.plan, be.scheduler.policy.prefill_cap
        caps: list[int | None] = []

        def cap(running):
            caps.append(cap_fn(running))
            return caps[-1]

        def plan():
            p = plan_fn()
            rows = [
                c for c in p.chunks if c.num_tokens == 1 and c.start >= c.request.num_prompt_tokens
            ]
            if caps and caps[-1] is not None and rows:
                floor = step.a + step.m0 + step.d * sum(c.start + 1 for c in rows)
                checked.append((step.step_time(p), floor))
            return p

        be.scheduler.policy.prefill_cap, be.loop.plan = cap, plan

    monkeypatch.setattr(bench.driver.SimBackend, "__init__", watched)
    run_sim(deep_research(num_apps=3, seed=0, arrival_rate=1.0), "tokencake", preset)
    assert len(checked) > 50
    over = [(t, f) for t, f in checked if t > f * (1 + 1e-9)]
    assert not over, f"{len(over)} of {len(checked)} capped steps past their floor: {over[:3]}"
