"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; dense below 10 ms, where single-image requests on CPU live.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)  # rows per session run


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tuneline_http_requests", "HTTP requests by route template and status",
                                ["method", "endpoint", "status"], registry=r)
        self.latency = Histogram("tuneline_http_request_duration_seconds", "HTTP request latency, seconds",
                                 ["method", "endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("tuneline_inference_requests_in_flight", "inference requests being handled", registry=r)
        self.rejected = Counter("tuneline_http_rejected", "requests refused before reaching a handler",
                                ["reason"], registry=r)
        self.batch_size = Histogram("tuneline_batch_size_rows", "rows per ONNX Runtime session run",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("tuneline_batch_queue_seconds", "time a request waited before its batch ran",
                                    ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.run_time = Histogram("tuneline_session_run_seconds", "ONNX Runtime session.run time per batch",
                                  ["model", "version", "provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_info = Gauge("tuneline_model_info", "1 for each loaded model version, with its provider",
                                ["name", "version", "provider", "role"], registry=r)
        self.loads = Counter("tuneline_model_loads", "model loads by result", ["result"], registry=r)
        self.load_failures = Counter("tuneline_model_load_failures", "failed model loads by reason (checksum, "
                                     "corrupt, alias, card, missing, metadata, device)", ["reason"], registry=r)
        self.ready = Gauge("tuneline_ready", "1 when a champion is loaded and warmed", registry=r)

    def observe_batch(self, model: str, version: str, provider: str, rows: int, queue_s: list[float],
                      run_s: float) -> None:
        self.batch_size.labels(model, version).observe(rows)
        queue = self.queue_time.labels(model, version)
        for wait in queue_s:
            queue.observe(wait)
        self.run_time.labels(model, version, provider).observe(run_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
