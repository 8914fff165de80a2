"""serve: the inference server's settings.

No stage imports this module: editing a field here reruns nothing. The three values the export gate and
the tuner's latency objective measure with (serve.device, serve.provider, serve.threads) are params deps of
those stages in dvc.yaml, so changing their values in params.yaml reruns exactly them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneline.core.config.base import MODEL_NAME_PATTERN, Section

MAX_WORKERS = 64


class ServeConfig(Section):
    """The inference server (serving/); env TUNELINE_SERVE_<KEY> and `tuneline serve` flags override these."""

    host: str = Field("127.0.0.1", description="loopback unless told otherwise")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="also serve the Open Inference Protocol over gRPC on this port (8001 is Triton's and KServe's); 0 = any free port, null = REST only")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda (cuda: refuse to start unless CUDA is really active)")
    provider: Literal["auto", "cuda", "tensorrt"] = Field("auto", description="GPU execution provider under serve.device auto/cuda: auto = cuda (CUDA kernels) | tensorrt (TensorRT, CUDA then CPU behind it for what it cannot take); with serve.device=cuda one that does not load refuses the start; ignored on CPU")
    precision: Literal["auto", "fp32", "fp16"] = Field("auto", description="auto: model.fp16.onnx only on a GPU provider when the export measured it there at least as fast and within export.max_quant_drop, else serve.model_file | fp32: serve.model_file | fp16: model.fp16.onnx")
    trt_cache_dir: str = Field(".tuneline/tensorrt", description="TensorRT engine cache (serve.provider=tensorrt), one folder per model version and precision; relative to the project")
    model: str | None = Field(None, pattern=f"^{MODEL_NAME_PATTERN}$", description="serve only this model name (default: the champion of every model in the registry)")
    model_file: str = Field("model.onnx", description="which file of a registry version to serve")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per core")
    workers: int | Literal["auto"] = Field("auto", description="server processes sharing serve.port (SO_REUSEPORT), each with its own event loop, models, batcher and ONNX Runtime threads; auto = one per CPU this process may use (its CPU affinity and its container's CPU limit, cgroup cpu.max), or 1 when the models run on a GPU; 1 = one process; with several, serve.threads 0 gives each worker (usable CPUs // workers) threads")
    batching: bool = Field(True, description="merge concurrent requests into one session run")
    max_batch_size: int = Field(64, ge=1, description="rows per session run")
    max_queue_delay_us: int = Field(2000, ge=0, description="longest a request waits for others to join its batch")
    reload_poll_s: float = Field(2.0, ge=0.0, description="how often aliases/champion.json is checked; 0 = never")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger requests get 413")
    max_audio_s: float = Field(30.0, gt=0.0, le=3600.0, description="speech models: the longest clip a request may send, in seconds (longer: 413); shorter and longer clips are fitted to the model's length as training fitted them")
    max_concurrency: int = Field(256, ge=1, description="inference requests in flight before 429")
    drain_delay_s: float = Field(5.0, ge=0.0, description="on SIGTERM, how long the server keeps serving with /v2/health/ready at 503 before it closes the listener and drains: time for load balancers and kube-proxy to stop sending it new connections (a few seconds; infra/k8s probes readiness every 2 s); 0 = close at once; a second signal skips the rest")
    shutdown_timeout_s: float = Field(10.0, gt=0.0, description="drain time for in-flight requests on SIGTERM, after serve.drain_delay_s (a stop takes at most their sum)")
    access_log: bool = Field(True, description="one JSON log line per request")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug | info | warning | error")
    notify_url: str | None = Field(None, description="pipeline: after a promotion, POST this server's load endpoint")
    # Closing the loop (docs/serving.md, "Challenger, drift and capture"): the challenger alias on live traffic,
    # drift of live inputs against the profile export stored in the model, captured traffic for fetch.
    challenger: Literal["off", "shadow", "canary"] = Field("off", description="the registry's challenger alias of each model on live traffic: off | shadow (the champion answers; serve.shadow_percent of requests also run on the challenger, off the response path, and are compared) | canary (serve.canary_percent of requests are answered by the challenger; sticky per x-tuneline-client key)")
    canary_percent: float = Field(10.0, ge=0.0, le=100.0, description="serve.challenger canary: the share of requests (percent) the challenger answers; a request with an x-tuneline-client key always gets the same version (a hash of the key decides)")
    shadow_percent: float = Field(10.0, ge=0.0, le=100.0, description="serve.challenger shadow: the share of requests (percent) also run on the challenger after the champion answered")
    shadow_queue: int = Field(256, ge=1, description="serve.challenger shadow: requests waiting for the challenger at most; when full, a sampled request is dropped and counted (the caller never waits)")
    drift_window: int = Field(1000, ge=10, description="rows of live inputs (and the champion's outputs) per model the drift score compares with the model's training profile (a sliding window)")
    drift_threshold: float = Field(0.25, gt=0.0, description="drift score (the largest population stability index over the profile's features) above which a model's live inputs count as drifted; 0.1-0.25 is the usual 'moderate shift' band, above 0.25 a significant one")
    capture: bool = Field(False, description="write a sample of requests (inputs, version, class, probability) to serve.capture_dir as JSONL for fetch to read back, and accept POST /v2/feedback labels; off by default: captured inputs are your users' data")
    capture_percent: float = Field(1.0, ge=0.0, le=100.0, description="serve.capture: the share of requests (percent) captured")
    capture_max_mb: float = Field(100.0, gt=0.0, description="serve.capture: the capture folder's size cap in MB: files are closed at a tenth of it and the oldest deleted beyond it")
    capture_dir: str = Field(".tuneline/capture", description="serve.capture: where capture-*.jsonl and feedback-*.jsonl files go; relative to the project")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        # Before the union's own checks: their errors would name a member (serve.workers.int), not the choices.
        # "auto" stays a word here; the server resolves it where it runs (serving/cpu_budget.py).
        count = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS
        if not (value == "auto" or count):
            raise ValueError(f"serve.workers takes an integer from 1 to {MAX_WORKERS} (server processes) or 'auto' "
                             "(one per CPU the server may use)")
        return value

    @field_validator("challenger", mode="before")
    @classmethod
    def _challenger(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads an unquoted `off` (-S serve.challenger=off) as false

    @model_validator(mode="after")
    def _precision_or_file(self) -> "ServeConfig":
        # Two settings must not disagree on which file is served: a variant named in model_file is the choice.
        if self.precision != "auto" and self.model_file != "model.onnx":
            raise ValueError(f"serve.precision={self.precision} and serve.model_file={self.model_file} both choose "
                             "the file: leave serve.precision at auto, or serve.model_file at model.onnx")
        return self

