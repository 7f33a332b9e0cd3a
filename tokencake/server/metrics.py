"""Prometheus collectors of one app and the per-request record."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokencake.outputs import KVStats, RequestOutput


class Metrics:
    """Prometheus collectors on a registry private to one app (tests build many apps)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokencake_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokencake_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "tokencake_generation_tokens", "Generated tokens.", registry=r
        )
        self.cached_tokens = Counter(
            "tokencake_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache.",
            registry=r,
        )
        self.finished = Counter(
            "tokencake_requests_finished",
            "Generation requests by finish reason.",
            ["reason"],
            registry=r,
        )
        self.events = Counter(
            "tokencake_lifecycle_events",
            "Lifecycle events by event and disposition.",
            ["event", "disposition"],
            registry=r,
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram(
            "tokencake_request_latency_seconds",
            "End-to-end generation latency.",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.ttft = Histogram(
            "tokencake_time_to_first_token_seconds",
            "Time to first token.",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.in_flight = Gauge(
            "tokencake_requests_in_flight", "Generation requests being served.", registry=r
        )
        self.kv_capacity = Gauge(
            "tokencake_kv_blocks_capacity", "Usable device KV blocks.", registry=r
        )
        self.kv_used = Gauge(
            "tokencake_kv_blocks_used", "Device KV blocks owned by live requests.", registry=r
        )
        self.kv_cached = Gauge(
            "tokencake_kv_blocks_cached", "Evictable prefix-cache blocks.", registry=r
        )
        self.kv_usage = Gauge(
            "tokencake_kv_usage_ratio", "Fraction of device KV blocks in use.", registry=r
        )
        self.waiting = Gauge(
            "tokencake_scheduler_waiting", "Requests waiting for admission.", registry=r
        )
        self.running = Gauge("tokencake_scheduler_running", "Requests running.", registry=r)
        self.engine_up = Gauge(
            "tokencake_engine_up", "1 while the engine thread serves.", registry=r
        )

    def set_kv(self, kv: KVStats) -> None:
        """Gauges of the device KV pool and the scheduler queues."""
        self.kv_capacity.set(kv.capacity)
        self.kv_used.set(kv.used)
        self.kv_cached.set(kv.cached)
        self.kv_usage.set(kv.usage)
        self.waiting.set(kv.waiting)
        self.running.set(kv.running)


def record(m: Metrics, chat: bool, final: RequestOutput, start: float) -> None:
    """Count a finished generation (tokens, finish reason, latency, TTFT)."""
    route = "chat" if chat else "completions"
    m.prompt_tokens.inc(len(final.prompt_token_ids))
    m.generation_tokens.inc(len(final.token_ids))
    m.cached_tokens.inc(final.num_cached_tokens)
    m.finished.labels(final.finish_reason or "unknown").inc()
    m.latency.labels(route).observe(time.perf_counter() - start)
    if "ttft_s" in final.metrics:
        m.ttft.labels(route).observe(final.metrics["ttft_s"])
