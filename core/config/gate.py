"""gate: the bars a model must clear (evaluate, export, promote; live_*: `tuneline models promote --live`)."""

from __future__ import annotations

from pydantic import Field

from tuneline.core.config.base import Section


class GateConfig(Section):
    """Bars a model must clear: quality (evaluate), serving cost (export), the champion (promote), live evidence
    (promote --live)."""

    min_accuracy: float = Field(0.99, ge=0.0, le=1.0, description="test accuracy a model must reach to be exported")
    min_class_recall: float = Field(0.97, ge=0.0, le=1.0, description="every class's recall (the weakest class) must reach this")
    max_ece: float = Field(0.03, ge=0.0, le=1.0, description="expected calibration error (15 bins) at most this")
    max_latency_p99_ms: float = Field(50.0, gt=0.0, description="batch 1, ONNX Runtime, on serve.device with serve.threads")
    max_size_mb: float = Field(20.0, gt=0.0, description="the FP32 model.onnx, 1 MB = 10^6 bytes")
    max_regression: float = Field(0.005, ge=0.0, le=1.0, description="accuracy the challenger may lose vs the champion")
    min_improvement: float = Field(0.001, ge=0.0, le=1.0, description="accuracy it must gain to be promoted")
    live_min_requests: int = Field(1000, ge=1, description="promote --live: live requests the challenger must have served (canary) or shadowed (shadow) in the server's window")
    live_min_agreement: float | None = Field(0.97, ge=0.0, le=1.0, description="promote --live: share of shadowed requests where the challenger predicts the champion's class (needs serve.challenger=shadow); null: not checked")
    live_min_accuracy: float | None = Field(None, ge=0.0, le=1.0, description="promote --live: accuracy on live requests that got a feedback label; null: not checked")
    live_max_error_rate: float = Field(0.01, ge=0.0, le=1.0, description="promote --live: the challenger's share of live requests that failed")
    live_max_p99_ms: float = Field(100.0, gt=0.0, description="promote --live: the challenger's p99 latency on the server, ms")

