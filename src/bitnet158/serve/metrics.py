"""Prometheus metrics of one server, in a registry of its own (so that several apps in one process,
as in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a few milliseconds (a token on a GPU) to minutes (a long answer on a CPU).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bitnet158_requests", "HTTP requests answered, by path and status code", ["path", "code"],
            registry=self.registry,
        )
        self.errors = Counter(
            "bitnet158_request_errors", "HTTP requests answered with an error, by status code", ["code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bitnet158_request_latency_seconds", "Time from a generation request's arrival to its last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "bitnet158_time_to_first_token_seconds", "Time from a generation request's arrival to its first token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.prompt_tokens = Counter("bitnet158_prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.generated_tokens = Counter("bitnet158_generated_tokens", "Tokens generated", registry=self.registry)
        self.running = Gauge("bitnet158_running_requests", "Requests holding a cache slot", registry=self.registry)
        self.waiting = Gauge("bitnet158_queued_requests", "Requests waiting for a slot", registry=self.registry)
        self.kv_cache_usage = Gauge(
            "bitnet158_kv_cache_usage_ratio", "Fraction of the KV cache's token positions in use",
            registry=self.registry,
        )
