"""Gates: named checks of a model's numbers against thresholds from params.yaml.

A blocking gate that fails stops the run (nothing exported, registered or promoted). A non-blocking one
records a decision instead: a quantized variant is rejected, or a version is kept without promotion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from tuneline.core.config.gate import GateConfig
from tuneline.core.errors import StageFailed


@dataclass(frozen=True)
class GateVerdict:
    name: str        # the params key of the threshold, e.g. "gate.min_accuracy"
    metric: str
    value: float
    threshold: float
    passed: bool
    direction: Literal["min", "max"] = "min"  # "min": value must reach the threshold; "max": stay under it
    blocking: bool = True                     # False: failing it is a decision (reject/keep), not a failed run

    @property
    def margin(self) -> float:
        """How far the value is on the passing side of the threshold (negative: by how much it failed)."""
        return self.value - self.threshold if self.direction == "min" else self.threshold - self.value

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else ("FAIL" if self.blocking else "not met")

    def describe(self) -> str:
        verdict = {"pass": "passed", "FAIL": "FAILED"}.get(self.verdict, self.verdict)
        return (f"gate {self.name} {verdict}: {self.metric} {self.value:.4f} vs threshold {self.threshold:.4f} "
                f"(margin {self.margin:+.4f})")

    def to_dict(self) -> dict:
        return {**asdict(self), "value": round(self.value, 6), "margin": round(self.margin, 6)}

    @classmethod
    def from_dict(cls, data: dict) -> GateVerdict:
        return cls(**{k: v for k, v in data.items() if k != "margin"})


def gate_min(name: str, metric: str, value: float, threshold: float, blocking: bool = True) -> GateVerdict:
    return GateVerdict(name, metric, float(value), float(threshold), value >= threshold, "min", blocking)


def gate_max(name: str, metric: str, value: float, threshold: float, blocking: bool = True) -> GateVerdict:
    return GateVerdict(name, metric, float(value), float(threshold), value <= threshold, "max", blocking)


class GateFailed(StageFailed, RuntimeError):
    """At least one blocking gate failed; the message names each failure in one line, `details` is the whole table."""

    def __init__(self, verdicts: list[GateVerdict], consequence: str = "the model is not exported"):
        self.verdicts, self.consequence = verdicts, consequence
        self.details = markdown_table(verdicts)
        failed = [v.describe() for v in verdicts if not v.passed and v.blocking]
        super().__init__("; ".join(failed) + f": {consequence}")

    def __reduce__(self):  # pickled with a failed task's result: rebuild from the verdicts, not the message
        return type(self), (self.verdicts, self.consequence)


def failed(verdicts: list[GateVerdict]) -> bool:
    return any(v.blocking and not v.passed for v in verdicts)


def check_gates(metrics: dict, cfg: GateConfig) -> list[GateVerdict]:
    """The model-quality gates on the test metrics of tuneline.tasks.evaluate.metrics.compute_metrics (run before export)."""
    return [
        gate_min("gate.min_accuracy", "test accuracy", metrics["accuracy"], cfg.min_accuracy),
        gate_min("gate.min_class_recall", "lowest per-class recall", metrics["min_class_recall"], cfg.min_class_recall),
        gate_max("gate.max_ece", "expected calibration error", metrics["ece"], cfg.max_ece),
    ]


def check_serving_gates(bench: dict, cfg: GateConfig) -> list[GateVerdict]:
    """Cost gates on the exported ONNX file, measured with ONNX Runtime on the serving device."""
    return [
        gate_max("gate.max_latency_p99_ms", f"p99 latency at batch 1, ms ({bench['provider']})",
                 bench["latency_p99_ms"], cfg.max_latency_p99_ms),
        gate_max("gate.max_size_mb", "ONNX file size, MB", bench["size_bytes"] / 1e6, cfg.max_size_mb),
    ]


def check_champion_gates(challenger: float, champion: float, cfg: GateConfig) -> list[GateVerdict]:
    """Challenger vs champion accuracy on the same test images: a regression beyond gate.max_regression fails
    the run; promotion needs an improvement of at least gate.min_improvement (else the version is only kept)."""
    change = challenger - champion
    return [
        gate_min("gate.max_regression", "accuracy change vs champion", change, -cfg.max_regression),
        gate_min("gate.min_improvement", "accuracy change vs champion", change, cfg.min_improvement, blocking=False),
    ]


def markdown_table(verdicts: list[GateVerdict]) -> str:
    rows = ["| gate | metric | value | threshold | margin | verdict |", "|---|---|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.metric} | {v.value:.4f} | {'≥' if v.direction == 'min' else '≤'} {v.threshold:.4f} | "
             f"{v.margin:+.4f} | {'**FAIL**' if v.verdict == 'FAIL' else v.verdict} |" for v in verdicts]
    return "\n".join(rows)
