"""Tokencake's Time Scheduler (paper digest §5.4-§5.9) and the per-tool-call KV actions.

While an agent waits on a tool, the KV of its finished LLM call sits in the device prefix cache
as evictable cached blocks. Per tool call (a lifecycle in ``active``) one of three actions:

* **KEEP**: pin the blocks (hold a reference) until the successor takes them, or a TTL passes
  (the safety valve: a wrong prediction costs at most the TTL of memory-time);
* **OFFLOAD**: copy the contiguous valid prefix to the host tier (retained there), unpin the
  device copies, then *predictively upload* it at ``start + predicted - max(lead, 1.25*h2d)``
  into device blocks reserved progressively over the preceding ``reservation_ramp_s`` (counted
  as committed capacity, §10, so restores never starve the queue head); hurry the upload if the
  tool returns early, give the device blocks back if it runs long;
* **DROP**: nothing; the successor hits whatever survived or recomputes.

The paper's pressure model (§5.4) and benefit function (§5.6) (``offload_benefit.py``) gate
OFFLOAD exactly; one cost model in seconds (transfer time, recompute time, memory-time held
under queue pressure) chooses between KEEP and DROP. The rule that picks the action is
pluggable (``time_decisions.py``: Tokencake's, Continuum's, InferCept's); this class carries
it out. Pins and copies change only *when* tokens are computed, never which.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from itertools import compress, filterfalse
from operator import attrgetter

from tokencake.memory.block_pool import BlockPool
from tokencake.memory.cost_model import CostModel
from tokencake.memory.host_pool import HostBlockPool
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.lifecycle import Lifecycle, LifecycleRecord
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.scheduler.offload_benefit import Pressure, Reason, evaluate_benefit
from tokencake.scheduler.plan import BlockCopy
from tokencake.scheduler.preservation import Preservation, PState
from tokencake.scheduler.request import Request
from tokencake.scheduler.time_decisions import Action, Decide, DecisionContext, tokencake_decide
from tokencake.scheduler.tokencake_config import TimeConfig
from tokencake.scheduler.waiting_queue import Mark, WaitingQueue, net_changes

_RANKED = attrgetter("reuse_ranked")


class TimeScheduler:
    """Per-tool-call KV actions, predictive upload and the copies they need."""

    def __init__(
        self,
        config: TimeConfig,
        pool: BlockPool,
        lifecycle: Lifecycle,
        copies: CopyTracker,
        host: HostBlockPool | None = None,
        cost: CostModel | None = None,
        decide: Decide = tokencake_decide,
        predictive_upload: bool | None = None,
        reevaluate: bool = True,
        reuse_eviction: bool | None = None,
    ) -> None:
        self.cfg = config
        self.pool = pool
        self.lifecycle = lifecycle
        self.copies = copies
        self.host = host
        self.cost: CostModel = cost or CostModel.paper_default()
        self.decide = decide
        self.predictive_upload = (
            config.predictive_upload if predictive_upload is None else predictive_upload
        )
        self.reevaluate = reevaluate
        self.reuse_eviction = (
            config.reuse_aware_eviction if reuse_eviction is None else reuse_eviction
        )
        self.items: dict[str, Preservation] = {}
        self._ranked: set[Request] = set()  # requests _rank_queued saw ranked (only those;
        # some may have left the queue since)
        # The queue as of the last ranking pass that saw every queued request (its mark): then
        # only requests that joined since can be unseen, and its log names them.
        self._seen: tuple[WaitingQueue, Mark] | None = None
        # Items a tick must visit (lifecycle id -> seq): every item that is not dormant, and
        # any whose lifecycle moved since the last tick. A queue of agents waiting to start
        # their tools would otherwise cost a tick (and each committed_blocks) a pass over all.
        self._active: dict[str, int] = {}
        self._seq = 0
        self.step = 0
        self._stores: deque[int] = deque(maxlen=96)
        self._last_store_step = -(10**9)
        self.counters: dict[str, int] = {}
        self.uploading: set[bytes] = set()
        self.copy_blocks = {"d2h": 0, "h2d": 0}
        self.current: str | None = None  # lifecycle id the tick is working on
        lifecycle.listeners.append(self._on_lifecycle)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ---- lifecycle events ---------------------------------------------------------------------
    def _on_lifecycle(self, rec: LifecycleRecord, transition: str) -> None:
        lid = rec.lifecycle_id
        if transition == "completed" and rec.snapshot:
            if lid not in self.items:
                self._seq += 1
                # tuple() of the core's snapshot tuple is that tuple: no copy to keep
                self.items[lid] = Preservation(rec, tuple(rec.snapshot), seq=self._seq)
        elif transition in ("started", "completed"):
            p = self.items.get(lid)
            if p is not None:
                p.next_eval_step = 0  # evaluate at the next tick
        elif transition == "finished":
            p = self.items.get(lid)
            if p is not None and p.state is PState.OFFLOADED:
                p.upload_at = min(p.upload_at, self.lifecycle.clock())  # early return: hurry
        # expired/aborted/reset: handled at the next tick (copies may be in flight)
        p = self.items.get(lid)
        if p is not None:
            self._active[lid] = p.seq  # any transition may end its dormancy

    def _visit(self) -> list[Preservation]:
        """The items a tick must look at, in creation order (dormant ones need nothing)."""
        items = self.items
        return [items[lid] for lid in sorted(self._active, key=self._active.__getitem__)]

    # ---- capacity promised to restores ----------------------------------------------------------
    def committed_blocks(self, now: float) -> int:
        """Blocks reserved for upcoming uploads, ramping linearly to the full restore size over
        ``reservation_ramp_s`` before the upload time (progressive reservation)."""
        ramp = self.cfg.reservation_ramp_s
        total = 0.0
        for p in self._visit():  # an offloaded item is never dormant
            if p.state is not PState.OFFLOADED or p.upload_at == math.inf:
                continue
            if ramp <= 0:
                frac = 1.0 if now >= p.upload_at else 0.0
            else:
                frac = min(1.0, max(0.0, (now - (p.upload_at - ramp)) / ramp))
            total += p.n_restore * frac
        return math.ceil(total)

    def next_due(self) -> float:
        """Earliest clock time at which :meth:`tick` has work even with no request running:
        a new stall to evaluate, a due upload, a TTL, an overrun, a hand-off grace, an ended
        lifecycle to settle. Without it an idle engine (every agent in a tool) never ticks and
        the predictive upload waits for the successor's arrival. ``math.inf``: nothing timed."""
        due = math.inf
        for p in self.items.values():
            rec = p.rec
            if p.inflight is not None:
                continue  # its completion wakes the engine (a copy in flight is work)
            if rec.terminal:
                held = p.pins and p.state in (PState.KEPT, PState.RESTORED)
                grace = self.cfg.handoff_grace_s if held and rec.cause == "finished" else 0.0
                due = min(due, (rec.terminal_at or 0.0) + grace)
            elif p.state is PState.OFFLOADED:
                due = min(due, p.upload_at)
            elif p.state is PState.KEPT:
                due = min(due, p.ttl)
            elif p.state is PState.RESTORED:
                due = min(due, rec.predicted_end + self.cfg.overrun_grace_s)
            elif rec.stalled and not p.decided:
                due = min(due, rec.started_at or 0.0)
        return due

    @property
    def stalled_blocks(self) -> int:
        """Device blocks held for agents that are waiting on a tool: pinned, or read by the
        copy-out of their offload."""
        n = 0
        for p in self.items.values():
            c = p.inflight
            n += (
                len(set(p.pins) | set(c.device_blocks))
                if c and c.direction == "d2h"
                else len(p.pins)
            )
        return n

    # ---- the tick ---------------------------------------------------------------------------
    def tick(
        self,
        now: float,
        waiting: Sequence[Request],
        running: Sequence[Request],
        pressure_fn: Callable[[], Pressure],
        agent_score: Callable[[AgentMetadata], float],
    ) -> None:
        """Once per schedule(): settle ended lifecycles, run uploads that are due, decide."""
        self.step += 1
        pressure: Pressure | None = None
        self.current = None
        for p in self._visit():
            lid = p.rec.lifecycle_id
            self.current = lid  # a failure below is this lifecycle's (see TokencakePolicy)
            if p.inflight is not None:
                continue  # wait for the copy to land
            rec = p.rec
            if rec.terminal:
                if rec.cause == "finished":
                    if p.state is PState.OFFLOADED and self.host is not None:
                        self._upload(p, now)
                        continue
                    if (
                        p.pins
                        and now < (rec.terminal_at or now) + self.cfg.handoff_grace_s
                        and not self._taken(p)
                    ):
                        continue
                self._drop(p)
                del self.items[lid]
                self._active.pop(lid, None)
                continue
            if p.state in (PState.KEPT, PState.RESTORED):
                if self._taken(p):
                    self._unpin(p)
                    p.state = PState.DROPPED
                elif p.state is PState.KEPT and now >= p.ttl:
                    self._count("ttl_expired")
                    self._unpin(p)
                    p.state = PState.DROPPED
                    p.ttl_spent = True
                elif (
                    p.state is PState.RESTORED
                    and now >= rec.predicted_end + self.cfg.overrun_grace_s
                ):
                    # The tool runs long: give the device blocks back, keep the host copy and
                    # upload again when it does return.
                    self._count("overrun_released")
                    self._unpin(p)
                    p.state = PState.OFFLOADED
                    p.upload_at = math.inf
            if p.state is PState.OFFLOADED and now >= p.upload_at:
                self._upload(p, now)
                continue
            if not rec.stalled or p.state not in (PState.KEPT, PState.DROPPED):
                continue
            if p.decided and (not self.reevaluate or self.step < p.next_eval_step):
                continue
            if pressure is None:
                pressure = pressure_fn()
            self._evaluate(p, now, pressure, agent_score(rec.metadata), running)
        self.current = None
        if self.reuse_eviction:
            self._rank_queued(waiting)
            for p in self._visit():
                self._rank_for_eviction(p)
        items = self.items
        self._active = {
            lid: seq for lid, seq in self._active.items() if lid in items and not items[lid].dormant
        }

    def _rank_queued(self, waiting: Sequence[Request], budget: int = 16) -> None:
        """A queued request's cached prefix is wanted as soon as it is admitted: rank it as
        awaited since its arrival, so it outlives every tool-waiting agent's blocks (and all
        unranked ones). Once per request (ranks stick until taken or evicted), at most
        ``budget`` new requests a tick: hashing a long prompt is not free."""
        # The ranked ones (nearly the whole queue, step after step) are skipped by a set probe,
        # which hashes a request by identity and never reads its attributes: reading
        # ``reuse_ranked`` off a thousand requests scattered in memory cost 3-4x as much. The
        # set only ever holds ranked requests (the flag is never cleared), so whatever it
        # misses is checked below: the same requests in the same order as a scan of the flag.
        # After a pass that saw every queued request (all in the set), only the requests that
        # joined the queue since can be new: a logged queue names them, in queue order, so the
        # pass reads a step's few changes instead of the thousand requests.
        known = self._ranked
        candidates: Sequence[Request] = waiting
        if len(known) > 2 * len(waiting) + 1024:  # a caller that never calls forget()
            known = self._ranked = set(compress(waiting, map(_RANKED, waiting)))
        elif self._seen is not None and self._seen[0] is waiting:
            queue, seen_at = self._seen
            changes = queue.since(seen_at)
            if changes is not None:
                candidates = net_changes(changes)[1]
        self._seen = None  # until this pass sees every request
        mark = waiting.mark() if isinstance(waiting, WaitingQueue) else None
        for r in filterfalse(known.__contains__, candidates):
            known.add(r)
            if r.reuse_ranked:
                continue
            r.reuse_ranked = True
            hashes = r.block_hashes(self.pool.block_size)
            n = self.pool.expect_reuse(self.pool.lookup_prefix(hashes), r.arrival_time)
            self._count("eviction_ranked_blocks", n)
            budget -= 1
            if budget == 0:
                return  # the rest of the queue waits for the next pass
        if mark is not None:
            self._seen = (waiting, mark)

    def forget(self, request: Request) -> None:
        """``request`` left the engine: the ranked set must not keep it (and its tokens) alive."""
        self._ranked.discard(request)

    def demote_unneeded(self, blocks: Sequence[int]) -> None:
        """Blocks whose owner has no successor (a finished leaf agent): evict them first."""
        if self.reuse_eviction:
            self._count("eviction_demoted_blocks", self.pool.demote(blocks))

    def _rank_for_eviction(self, p: Preservation) -> None:
        """A dropped agent's blocks stay cached on device until evicted; tell the pool when
        they will be wanted (the tool's predicted return), so it evicts blocks with no known
        reuse, and those wanted later, before them. Re-ranked when the prediction moves."""
        rec = p.rec
        if p.state is not PState.DROPPED or p.inflight is not None or rec.terminal:
            return
        if not rec.stalled or p.ranked_for == rec.predicted_end:
            return
        p.ranked_for = rec.predicted_end
        n = self.pool.expect_reuse(self.pool.lookup_prefix(p.hashes), rec.predicted_end)
        self._count("eviction_ranked_blocks", n)

    def _taken(self, p: Preservation) -> bool:
        """The successor (or anyone) now holds a reference of its own on our blocks."""
        pool = self.pool
        return any(pool.ref_count(b) > 1 for b in p.pins)

    def _churn(self) -> float:
        w = self.cfg.churn_window_steps
        c = 1.5 if self.step - self._last_store_step <= w else 0.0
        recent = sum(1 for s in self._stores if self.step - s < w)
        return c + min(4.0, max(0, recent - self.cfg.churn_budget_stores) / 8)

    def _evaluate(
        self,
        p: Preservation,
        now: float,
        pressure: Pressure,
        score: float,
        running: Sequence[Request],
    ) -> None:
        rec = p.rec
        pool, host = self.pool, self.host
        cpu_available = host.num_free if host is not None else 0
        sig = (pressure.free, pressure.waiting_count, pressure.waiting_demand, pressure.critical_demand,
               pressure.shared_available, pressure.fit_demand, cpu_available)  # fmt: skip
        if p.decided and sig == p.last_sig:
            self._count(Reason.BACKOFF.value)
            p.next_eval_step = self.step + self.cfg.backoff_steps
            return
        dev = pool.lookup_prefix(p.hashes)
        remaining = max(0.0, rec.predicted_end - now)
        # Contiguous preservable prefix: each block already written on host or valid on device;
        # cut where the copy would not leave max(50 ms, 2x its own time) of the window.
        count = new = 0
        if host is not None:
            for i, h in enumerate(p.hashes):
                hb = host.block_of(h)
                on_host = hb is not None and not host.is_pending(hb)
                if not on_host and i >= len(dev):
                    break
                n_new = new + (0 if on_host else 1)
                t = self.cost.copy_time(n_new, "d2h") + self.cost.copy_time(i + 1, "h2d")
                if n_new > cpu_available or remaining - t < max(0.05, 2 * t):
                    break
                if self.cfg.max_relief_blocks and i + 1 > min(
                    pressure.fit_demand, self.cfg.max_relief_blocks
                ):
                    break
                count, new = i + 1, n_new
        T = self.cost.copy_time(new, "d2h") + self.cost.copy_time(count, "h2d")
        reason, bscore = evaluate_benefit(rec.metadata, score, remaining, T, count, new, cpu_available,
                                          pressure, self._churn(), self.cfg)  # fmt: skip
        if host is None and reason is Reason.SELECTED:
            reason = Reason.CPU_CAPACITY
        running_blocks = sum(len(r.block_ids) for r in running)
        ctx = DecisionContext(rec, now, remaining, len(dev), count, new, T, pressure, reason, bscore,
                              pool.capacity, running_blocks, host is not None)  # fmt: skip
        action = self.decide(ctx, self)
        if action is Action.OFFLOAD and (host is None or count == 0):
            action = Action.KEEP if dev and rec.metadata.preservable else Action.DROP
        if action is Action.KEEP and p.ttl_spent:
            # The TTL bounds what a wrong prediction may cost. Past the predicted end the keep
            # cost (remaining stall x share held) is 0, so without this the next evaluation
            # re-pinned at once and the blocks stayed held until the safety deadline.
            action = Action.DROP
        if action is Action.KEEP and p.state is not PState.KEPT:
            # Pinning turns evictable cached blocks into held ones; admitted requests count on
            # that capacity for their growth, so never pin into committed capacity.
            cached = sum(1 for b in dev if pool.ref_count(b) == 0)
            if cached > pressure.uncommitted:
                action = Action.DROP
        self._count(reason.value)
        self._count(f"action_{action.value}")
        p.decided = True
        p.last_sig = sig
        p.next_eval_step = self.step + self.cfg.backoff_steps
        if action is Action.OFFLOAD:
            self._offload(p, dev, count, now)
        elif action is Action.KEEP:
            if p.state is not PState.KEPT:
                pool.hold(dev)
                p.pins = list(dev)
                p.state = PState.KEPT
            ttl = min(
                self.cfg.keep_ttl_max_s,
                max(self.cfg.keep_ttl_min_s, self.cfg.keep_ttl_factor * remaining),
            )
            p.ttl = min(now + ttl, rec.safety_deadline)
        else:
            self._unpin(p)
            p.state = PState.DROPPED

    # ---- actions ------------------------------------------------------------------------------
    def _unpin(self, p: Preservation) -> None:
        if p.pins:
            self.pool.free(p.pins)
            p.pins = ()

    def _let_go(self, p: Preservation) -> None:
        """Unpin ``p`` and cancel its upload: its host copy (if any) stays retained, and a
        successor copies those pages in when it is admitted."""
        self._unpin(p)
        p.state = PState.OFFLOADED if p.host_retained else PState.DROPPED
        p.upload_at = math.inf

    def _drop(self, p: Preservation) -> None:
        self._unpin(p)
        if p.host_retained and self.host is not None:
            self.host.release(p.host_retained)
        p.host_retained = ()
        p.state = PState.DROPPED

    def _offload(self, p: Preservation, dev: list[int], count: int, now: float) -> None:
        host = self.host
        hashes = p.hashes[:count]
        # Retain what the host already has first, so allocating the rest cannot evict it.
        p.host_retained = retained = host.retain(hashes)
        src: list[int] = []
        dst: list[int] = []
        for i, h in enumerate(hashes):
            if host.block_of(h) is not None:
                continue
            got = host.try_allocate(1) if i < len(dev) else None
            if got is None:
                count = i  # keep the contiguous prefix that fits
                break
            host.register(got[0], h, pending=True)
            retained += host.retain([h])
            src.append(dev[i])
            dst.append(got[0])
        p.n_restore = count
        h2d = self.cost.copy_time(count, "h2d")
        self.lifecycle.set_h2d_estimate(p.rec, h2d)
        p.upload_at = p.rec.release_deadline if self.predictive_upload else math.inf
        self._stores.append(self.step)
        self._last_store_step = self.step
        self._count("offloads")
        # With write-back of every block the host usually has them all already (new = 0):
        # the offload then only schedules the restore (bench/RESULTS.md, issue 12 round 4).
        self._count("offload_blocks", count)
        self._count("offload_new_blocks", len(dst))
        if dst:  # the tracker holds ``src`` until the copy lands (a kept call keeps its pins)
            landed = partial(self._offloaded, p)
            p.inflight = self.copies.issue("d2h", src, dst, self._tag("d2h", p), self, landed)
            self.copy_blocks["d2h"] += len(src)
            p.state = PState.OFFLOADING
        else:
            self._unpin(p)
            p.state = PState.OFFLOADED

    def _upload(self, p: Preservation, now: float) -> None:
        host, pool = self.host, self.pool
        hits = pool.lookup_prefix(p.hashes[: p.n_restore])
        pool.hold(hits)
        rest = p.hashes[len(hits) : p.n_restore]
        hblocks = host.lookup_prefix(rest)
        n = min(len(hblocks), pool.num_free)
        dev = pool.allocate(n)  # ours; registered and pinned for the successor once landed
        p.pins = list(hits)
        p.upload_at = math.inf
        self._count("uploads")
        self._count("upload_device_hits", len(hits))  # still cached on device: pinned
        self._count("upload_copied_blocks", n)
        if n:
            landed = partial(self._uploaded, p, rest[:n])
            p.inflight = self.copies.issue(
                "h2d", dev, hblocks[:n], self._tag("h2d", p), self, landed
            )
            self.copy_blocks["h2d"] += n
            self.uploading.update(rest[:n])
            p.state = PState.UPLOADING
        else:
            p.state = PState.RESTORED

    # ---- copy completions (the shared CopyTracker calls these) --------------------------------
    @staticmethod
    def _tag(direction: str, p: Preservation) -> str:
        return f"tc-{direction}:{p.rec.lifecycle_id}"

    def _offloaded(self, p: Preservation, copy: BlockCopy, ok: bool) -> None:
        """The offload's copy-out ended (host pages already published or discarded)."""
        p.inflight = None
        self._unpin(p)  # a kept call's device copies become evictable cached blocks
        if ok:
            p.state = PState.OFFLOADED
        else:
            self._count("failed_copies")
            self._drop(p)

    def _uploaded(
        self, p: Preservation, hashes: Sequence[bytes], copy: BlockCopy, ok: bool
    ) -> None:
        """The upload's copy-in ended: register the pages and pin them for the successor."""
        p.inflight = None
        pool = self.pool
        for h in hashes:
            self.uploading.discard(h)
        if not ok:
            self._count("failed_copies")
            pool.free(copy.device_blocks)  # never registered: back to the free list, no stale hash
            p.state = PState.OFFLOADED
            return
        kept = []
        for b, h in zip(copy.device_blocks, hashes, strict=True):
            pool.register(b, h)
            if pool.hash_of(b) == h:
                kept.append(b)
            else:
                pool.free([b])  # an identical block got cached meanwhile: ours is moot
        p.pins = [*p.pins, *kept]  # after the device hits _upload pinned
        p.state = PState.RESTORED

    def release_pins(self, blocks: int) -> int:
        """Unpin kept agents' blocks until ``blocks`` of them are evictable again, the call
        predicted to return last first (then pages restored for a successor that has not
        arrived); returns how many blocks that freed.

        A running request short of a block would otherwise be preempted (or preempt another):
        its KV leaves the device while KV that nothing reads until a tool returns stays
        pinned. On multi-turn seed 3 (10 sessions, 1.0 apps/s) the longest session, running
        alone, preempted itself at a 16.7k-token context with the rest of the pool pinned, and
        waited 21 s to come back. Unpinned pages stay in the device prefix cache (and in the
        host tier when written back) until evicted, so a successor may still hit them."""
        pool = self.pool
        held = [p for p in self.items.values()
                if p.inflight is None and p.pins and p.state in (PState.KEPT, PState.RESTORED)]  # fmt: skip
        held.sort(key=lambda p: (p.state is PState.RESTORED, -p.rec.predicted_end))
        freed = 0
        for p in held:
            if freed >= blocks:
                break
            freed += sum(1 for b in p.pins if pool.ref_count(b) == 1)
            self._let_go(p)
            p.ttl_spent = True  # not pinned again for this call
        if freed:
            self._count("growth_released_blocks", freed)
        return freed

    def relieve(self) -> bool:
        """Nothing runs and the queue head cannot start: give back every pin and reservation
        (correctness never depends on them). True if anything was released."""
        freed = False
        for p in self.items.values():
            if p.inflight is None and p.rec.terminal and p.state is not PState.DROPPED:
                # An ended call's pages wait for a successor that cannot start. Kept OFFLOADED,
                # the next tick would upload (re-pin) them for it at once, and every step would
                # pin and relieve again while the queue head never fits: a livelock. Dropped,
                # they stay findable in both tiers' prefix caches until evicted.
                self._drop(p)
                freed = True
                continue
            if p.inflight is None and p.pins:
                self._let_go(p)
                freed = True
            if p.state is PState.OFFLOADED and p.upload_at != math.inf:
                p.upload_at = math.inf
                freed = True
        if freed:
            self._count("relieved")
        return freed
