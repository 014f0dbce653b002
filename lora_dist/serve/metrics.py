"""Prometheus metrics of the service, per adapter: requests, latency, batch sizes and errors (GET /metrics).

    curl -s http://127.0.0.1:8000/metrics | grep lora_dist_

Each service has its own registry, so two in one process (tests) do not share counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they double the output and say little here

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Ran(Protocol):
    """A request in a forward pass, as the metrics see it (batcher.Request)."""

    adapter: str
    texts: list[str]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "lora_dist_requests",
            "classify requests answered, by adapter and HTTP status",
            ["adapter", "status"],
            registry=r,
        )
        self.messages = Counter("lora_dist_messages", "messages classified, by adapter", ["adapter"], registry=r)
        self.latency = Histogram(
            "lora_dist_request_seconds",
            "classify request latency (queue + model), by adapter",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "lora_dist_batch_size", "messages per forward pass (all adapters)", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "lora_dist_batch_rows",
            "an adapter's messages in each forward pass it is in",
            ["adapter"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "lora_dist_errors", "failed requests, by adapter and reason", ["adapter", "reason"], registry=r
        )
        self.queued = Gauge("lora_dist_queued_requests", "requests waiting for or in a forward pass", registry=r)
        self.abandoned = Counter(
            "lora_dist_abandoned_requests", "classify requests whose client left before the answer", registry=r
        )
        self.skipped = Counter(
            "lora_dist_skipped_requests", "abandoned requests dropped before the model ran them", registry=r
        )
        self.connections = Gauge("lora_dist_open_connections", "open HTTP connections", registry=r)
        self.dropped = Counter(
            "lora_dist_dropped_connections",
            "connections closed by the service: read_timeout (a request not read in --read-timeout-s) or "
            "too_many (past --max-connections)",
            ["reason"],
            registry=r,
        )

        # adapters on demand (--adapters-dir): the LRU slots on the model's device
        self.cache_hits = Counter(
            "lora_dist_adapter_cache_hits", "requests whose adapter was resident when they arrived", registry=r
        )
        self.cache_misses = Counter(
            "lora_dist_adapter_cache_misses", "requests whose adapter had to be read from disk", registry=r
        )
        self.evictions = Counter(
            "lora_dist_adapter_evictions", "adapters evicted from their slot (least recently used)", registry=r
        )
        self.loads = Counter(
            "lora_dist_adapter_loads",
            "adapter reads from disk, by result (ok, gone, unavailable)",
            ["result"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "lora_dist_adapter_load_seconds",
            "time to read and check one adapter's tensors from disk",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )
        self.adapters_resident = Gauge("lora_dist_adapters_resident", "adapters in a slot on the device", registry=r)
        self.adapters_known = Gauge("lora_dist_adapters_known", "adapters the service lists", registry=r)
        self.reloads = Counter("lora_dist_adapter_reloads", "rescans of the adapters (SIGHUP, POST)", registry=r)

    def batch_done(self, batch: Sequence[Ran]) -> None:
        """A forward pass ran `batch`: its size, and each adapter's share of it."""
        self.batch.observe(sum(len(r.texts) for r in batch))
        per: dict[str, int] = {}
        for r in batch:
            per[r.adapter] = per.get(r.adapter, 0) + len(r.texts)
        for adapter, n in per.items():
            self.batch_rows.labels(adapter).observe(n)

    def error(self, adapter: str, reason: str, status: int) -> None:
        """A request answered with an error `status`, for `reason`."""
        self.errors.labels(adapter, reason).inc()
        self.requests.labels(adapter, str(status)).inc()

    def render(self) -> bytes:
        """Every metric, in Prometheus' text format (GET /metrics)."""
        return generate_latest(self.registry)
