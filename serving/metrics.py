"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process).

With serve.workers > 1 the server is several processes, and a scrape reaches one of them; so each worker's values
live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, a folder serving/workers.py makes for
the server and passes to its workers) and every worker renders the server's totals from all of them
(`aggregate`): counters and histograms summed over every worker that ran (a stopped worker's requests still
count), gauges per their mode below over the live workers. Names, labels and help texts are the same either way;
only the `_created` samples are missing in that mode (prometheus_client does not write them to the files).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; dense below 10 ms, where single-image requests on CPU live.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)  # rows per session run
MODEL_INFO = "tuneline_model_info"
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._render_registry = self.registry  # what render() exposes; aggregate() swaps in the multiprocess one
        self.multiprocess = False
        r = self.registry
        self.requests = Counter("tuneline_http_requests", "HTTP requests by route template and status",
                                ["method", "endpoint", "status"], registry=r)
        self.latency = Histogram("tuneline_http_request_duration_seconds", "HTTP request latency, seconds",
                                 ["method", "endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        # The gauges' multiprocess modes only matter with serve.workers > 1 (one process ignores them).
        # In flight: the server's, so the sum over the live workers.
        self.in_flight = Gauge("tuneline_inference_requests_in_flight", "inference requests being handled", registry=r,
                               multiprocess_mode="livesum")
        self.rejected = Counter("tuneline_http_rejected", "requests refused before reaching a handler",
                                ["reason"], registry=r)
        self.batch_size = Histogram("tuneline_batch_size_rows", "rows per ONNX Runtime session run",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("tuneline_batch_queue_seconds", "time a request waited before its batch ran",
                                    ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.run_time = Histogram("tuneline_session_run_seconds", "ONNX Runtime session.run time per batch",
                                  ["model", "version", "provider"], buckets=LATENCY_BUCKETS, registry=r)
        # A version loaded in any live worker is listed once (the repository routes load it in every worker).
        self.model_info = Gauge(MODEL_INFO, "1 for each loaded model version, with its provider",
                                ["name", "version", "provider", "role"], registry=r, multiprocess_mode="livemax")
        self.loads = Counter("tuneline_model_loads", "model loads by result", ["result"], registry=r)
        self.load_failures = Counter("tuneline_model_load_failures", "failed model loads by reason (checksum, "
                                     "corrupt, alias, card, missing, metadata, device)", ["reason"], registry=r)
        # 1 only once every live worker has its champion warm: a worker still loading shows as 0, not hidden.
        self.ready = Gauge("tuneline_ready", "1 when a champion is loaded and warmed", registry=r,
                           multiprocess_mode="livemin")
        # Live comparison of the versions served (serving/live.py has the same numbers as JSON at GET /v2/live).
        # role: champion, challenger (canary answers and shadow runs) or loaded (a version asked for by name).
        version_labels = ["model", "version", "role"]
        self.live_requests = Counter("tuneline_live_requests", "inference requests per model version and role",
                                     version_labels, registry=r)
        self.live_errors = Counter("tuneline_live_errors", "inference requests a model version failed to answer",
                                   version_labels, registry=r)
        self.live_latency = Histogram("tuneline_live_latency_seconds", "time from a request's rows reaching the "
                                      "model's batcher to its answer, seconds", version_labels,
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.predicted = Counter("tuneline_predicted_class", "rows answered per predicted class",
                                 [*version_labels, "class"], registry=r)
        self.confidence = Histogram("tuneline_confidence", "the answered class's probability per row",
                                    version_labels, buckets=CONFIDENCE_BUCKETS, registry=r)
        self.shadow_compared = Counter("tuneline_shadow_compared", "rows the challenger ran in shadow and compared "
                                       "with the champion's answer", ["model", "version"], registry=r)
        self.shadow_agreed = Counter("tuneline_shadow_agreed", "shadow rows where the challenger's class was the "
                                     "champion's", ["model", "version"], registry=r)
        self.shadow_dropped = Counter("tuneline_shadow_dropped", "sampled requests not run in shadow: the queue "
                                      "(serve.shadow_queue) was full", ["model", "version"], registry=r)
        # The server's score (every worker's window merged); the last worker to compute it sets it.
        self.drift_score = Gauge("tuneline_drift_score", "drift score of live inputs against the champion's training "
                                 "profile (largest PSI over its features)", ["model"], registry=r,
                                 multiprocess_mode="livemostrecent")
        self.drift_threshold = Gauge("tuneline_drift_threshold", "serve.drift_threshold", registry=r,
                                     multiprocess_mode="livemax")
        self.captured = Counter("tuneline_captured_rows", "rows written to serve.capture_dir", ["model"], registry=r)
        self.feedback = Counter("tuneline_feedback", "labels received at POST /v2/feedback", registry=r)

    def aggregate(self, folder: Path) -> None:
        """Render the totals of every process writing metrics to `folder` (this process's PROMETHEUS_MULTIPROC_DIR)
        from now on, instead of this process's own values."""
        from prometheus_client import values

        if values.ValueClass is values.MutexValue:  # the values live in this process only: the sum would miss them
            raise RuntimeError(f"metrics: PROMETHEUS_MULTIPROC_DIR={folder} must be set before prometheus_client is "
                               "imported (serving/workers.py sets it for each worker it starts)")
        registry = CollectorRegistry()
        registry.register(_WorkersCollector(folder))
        self._render_registry, self.multiprocess = registry, True

    def drop_model_info(self, name: str, version: str, provider: str, role: str) -> None:
        """Stop listing a model version (unloaded, or replaced as champion); nothing if it is not listed."""
        if self.multiprocess:
            # prometheus_client cannot remove a series from the files: 0 marks it gone (_WorkersCollector skips it).
            self.model_info.labels(name, version, provider, role).set(0)
            return
        try:
            self.model_info.remove(name, version, provider, role)
        except KeyError:
            pass

    def observe_batch(self, model: str, version: str, provider: str, rows: int, queue_s: list[float],
                      run_s: float) -> None:
        self.batch_size.labels(model, version).observe(rows)
        queue = self.queue_time.labels(model, version)
        for wait in queue_s:
            queue.observe(wait)
        self.run_time.labels(model, version, provider).observe(run_s)

    def render(self) -> bytes:
        return generate_latest(self._render_registry)


class _WorkersCollector:
    """prometheus_client's MultiProcessCollector over `folder`, less the model_info series dropped (value 0)."""

    def __init__(self, folder: Path):
        from prometheus_client.multiprocess import MultiProcessCollector

        self.collector = MultiProcessCollector(None, str(folder))

    def collect(self):
        for family in self.collector.collect():
            if family.name == MODEL_INFO:
                family.samples = [s for s in family.samples if s.value != 0]
            yield family
