"""Prometheus metrics under TGI's names (plus tgserve_* for what TGI has no name for)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tgserve.protocol import EngineStats

_DURATION_BUCKETS = tuple(0.00015 * 1.5**k for k in range(35))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_count = Counter("tgi_request_count", "Generation requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests that completed", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Requests that failed", ["err"], registry=r)
        self.request_duration = Histogram("tgi_request_duration", "End-to-end request seconds",
                                          buckets=_DURATION_BUCKETS, registry=r)
        self.generated_tokens = Histogram("tgi_request_generated_tokens", "Tokens generated per request",
                                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                                          registry=r)
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting in the engine queue", registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Sequences in the running batch", registry=r)
        self.kv_free = Gauge("tgserve_kv_cache_free_blocks", "Free KV-cache blocks", registry=r)
        self.kv_total = Gauge("tgserve_kv_cache_total_blocks", "KV-cache blocks in all", registry=r)

    def engine_stats(self, stats: EngineStats) -> None:
        self.queue_size.set(stats.num_waiting)
        self.batch_size.set(stats.num_running)
        self.kv_free.set(stats.num_free_blocks)
        self.kv_total.set(stats.num_total_blocks)

    def success(self, seconds: float, generated_tokens: int) -> None:
        self.request_success.inc()
        self.request_duration.observe(seconds)
        self.generated_tokens.observe(generated_tokens)

    def failure(self, error_type: str) -> None:
        self.request_failure.labels(err=error_type).inc()

    def dropped(self) -> None:
        self.request_failure.labels(err="dropped").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
