"""export: ONNX export, its parity check, and the FP16/INT8 variants."""

from __future__ import annotations

from pydantic import Field

from tuneline.core.config.base import Section


class ExportConfig(Section):
    """ONNX export, its parity check against PyTorch, and the FP16/INT8 variants."""

    opset: int = Field(18, ge=17, description="ONNX opset version")
    parity_atol: float = Field(1e-4, gt=0.0, description="max |ONNX - PyTorch| logit difference accepted")
    fp16: bool = Field(False, description="also write model.fp16.onnx (gated on its accuracy drop)")
    int8: bool = Field(True, description="also write model.int8.onnx (static, calibrated on train images)")
    max_quant_drop: float = Field(0.005, ge=0.0, le=1.0, description="test accuracy a variant may lose vs the FP32 ONNX")
    calibration_images: int = Field(512, ge=1, description="training images that calibrate INT8 activation ranges")
    latency_runs: int = Field(200, ge=10, description="timed batch-1 runs behind p50/p99 (on serve.device)")

