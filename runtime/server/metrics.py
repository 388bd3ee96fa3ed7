"""/metrics in Prometheus text format.

prometheus_client rather than hand-written exposition: it is small and dependency-free,
and it gets the details right that a hand-written one tends to get wrong (cumulative
`le` buckets with `+Inf`, `_sum`/`_count`, label escaping, HELP/TYPE lines). Each app
has its own registry so that several servers in one process (the tests) do not share
counters. Queue depth and running sequences are read from the engine at scrape time,
so they are never stale.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; token latencies of a CPU engine span ~1 ms (tiny models) to seconds (33B)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Gauges from engine.health(): waiting (queue depth), running, slots, ready."""

    def __init__(self, health: Callable[[], dict]):
        self.health = health

    def collect(self):
        try:
            h = self.health()
        except Exception:  # a failing engine must not break the scrape
            h = {"state": "failed"}
        for name, key, doc in (("queue_depth", "waiting", "Sequences waiting for a slot."),
                               ("running_sequences", "running", "Sequences being decoded."),
                               ("slots", "slots", "Sequences the engine can decode at once.")):
            g = GaugeMetricFamily(f"dsflow_{name}", doc)
            g.add_metric([], float(h.get(key, 0)))
            yield g
        g = GaugeMetricFamily("dsflow_engine_ready", "1 when the engine accepts requests.")
        g.add_metric([], 1.0 if h.get("state") == "ready" else 0.0)
        yield g
        c = CounterMetricFamily("dsflow_prefix_reused_tokens",
                                "Prompt tokens not prefilled: a free slot held them "
                                "(prefix reuse).")
        c.add_metric([], float(h.get("prefix_reused_tokens", 0)))
        yield c


class Metrics:
    def __init__(self, health: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsflow_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("dsflow_prompt_tokens",
                                     "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("dsflow_generation_tokens",
                                         "Tokens generated.", registry=r)
        self.restarts = Counter("dsflow_engine_restarts",
                                "Worker cluster restarts after a failure.", registry=r)
        self.time_to_first_token = Histogram(
            "dsflow_time_to_first_token_seconds",
            "From request admission to a choice's first token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "dsflow_inter_token_latency_seconds", "Time between a choice's tokens.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram(
            "dsflow_request_duration_seconds", "HTTP request duration, to the last byte.",
            buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(health))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
