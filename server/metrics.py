"""Prometheus metrics, in a registry of their own so every app (and test) counts separately."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pixelllm.memory import malloc_stats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The service's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pixelllm_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "pixelllm_request_seconds", "Request latency by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "pixelllm_batch_size", "Requests per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_seconds = Histogram(
            "pixelllm_batch_seconds", "Time of one batched model call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "pixelllm_queue_depth",
            "Requests admitted and not yet answered: decoding their image, queued or running",
            registry=r,
        )
        self.cache_hits = Counter("pixelllm_cache_hits", "Image embedding cache hits", registry=r)
        self.cache_misses = Counter("pixelllm_cache_misses", "Image embedding cache misses", registry=r)
        self.cache_bytes = Gauge("pixelllm_cache_bytes", "Bytes held by the embedding cache", registry=r)
        self.cache_entries = Gauge("pixelllm_cache_entries", "Embeddings held by the cache", registry=r)
        self.stream_first_word = Histogram(
            "pixelllm_stream_first_word_seconds",
            "Streamed captions: from the request to its first word",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs_abandoned = Counter(
            "pixelllm_jobs_abandoned",
            "Requests whose client left or timed out while their batch was running: model steps not yet "
            "started were skipped for them",
            registry=r,
        )
        self.streams_cancelled = Counter(
            "pixelllm_streams_cancelled", "Streamed captions stopped early because the client left", registry=r
        )
        if malloc_stats() is not None:  # glibc: what the process uses, apart from what malloc keeps for reuse
            in_use = Gauge("pixelllm_malloc_in_use_bytes", "Bytes malloc has handed out, not yet freed", registry=r)
            kept = Gauge("pixelllm_malloc_free_bytes", "Freed bytes malloc keeps for reuse", registry=r)
            in_use.set_function(lambda: malloc_stats()[0])  # type: ignore[index]
            kept.set_function(lambda: malloc_stats()[1])  # type: ignore[index]

    def render(self) -> bytes:
        return generate_latest(self.registry)
