"""Gates: named checks of a model's metrics against thresholds from params.yaml; any failure stops shipping."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tasks.config import GateConfig


@dataclass(frozen=True)
class GateVerdict:
    name: str        # the params key of the threshold, e.g. "gate.min_accuracy"
    metric: str
    value: float
    threshold: float
    passed: bool

    @property
    def margin(self) -> float:
        """How far the value is on the passing side of the threshold (negative: by how much it failed)."""
        return self.value - self.threshold

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"gate {self.name} {verdict}: {self.metric} {self.value:.4f} vs threshold {self.threshold:.4f} "
                f"(margin {self.margin:+.4f})")

    def to_dict(self) -> dict:
        return {**asdict(self), "margin": round(self.margin, 6)}


class GateFailed(RuntimeError):
    """At least one gate failed; the message lists each failed gate with value and threshold."""

    def __init__(self, verdicts: list[GateVerdict]):
        self.verdicts = verdicts
        failed = [v.describe() for v in verdicts if not v.passed]
        super().__init__("; ".join(failed) + ": the model is not exported")


def check_gates(metrics: dict, cfg: GateConfig) -> list[GateVerdict]:
    """Evaluate every gate on the test metrics."""
    accuracy = float(metrics["accuracy"])
    return [GateVerdict("gate.min_accuracy", "test accuracy", accuracy, cfg.min_accuracy, accuracy >= cfg.min_accuracy)]


def markdown_table(verdicts: list[GateVerdict]) -> str:
    rows = ["| gate | metric | value | threshold | margin | verdict |", "|---|---|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.metric} | {v.value:.4f} | {v.threshold:.4f} | {v.margin:+.4f} | "
             f"{'pass' if v.passed else '**FAIL**'} |" for v in verdicts]
    return "\n".join(rows)
