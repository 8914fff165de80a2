"""metrics/eval.json, the evaluate stage's report: one typed writer and reader for every consumer.

The export stage (ONNX metadata), the promote step (model card) and the flow's summary read the file
through `EvalReport.read`, never by indexing the JSON themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.core.atomic import write_bytes_atomic
from tuneline.tasks.evaluate.gate import GateVerdict

# The headline numbers that travel with the model (ONNX metadata, registry card).
HEADLINE = ("accuracy", "loss", "n_test", "macro_f1", "ece")


@dataclass(frozen=True)
class EvalReport:
    accuracy: float
    loss: float
    n_test: int
    macro_f1: float | None = None
    ece: float | None = None
    gates: list[GateVerdict] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # per-class numbers and the rest of compute_metrics

    @property
    def gates_passed(self) -> bool:
        return all(v.passed for v in self.gates)

    def headline(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HEADLINE if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {**self.headline(), **self.details, "gates": [v.to_dict() for v in self.gates],
                "gates_passed": self.gates_passed, "lineage": self.lineage}

    def write(self, path: Path) -> None:
        write_bytes_atomic(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], gates: list[GateVerdict], lineage: dict[str, Any]) -> EvalReport:
        """From tuneline.tasks.evaluate.metrics.compute_metrics's dict plus the verdicts and the model's lineage."""
        details = {k: v for k, v in metrics.items() if k not in HEADLINE}
        return cls(**{k: metrics.get(k) for k in HEADLINE}, gates=list(gates), lineage=dict(lineage), details=details)

    @classmethod
    def read(cls, path: Path) -> EvalReport:
        try:
            data = json.loads(Path(path).read_text())
            gates = [GateVerdict.from_dict(g) for g in data.pop("gates", [])]
            data.pop("gates_passed", None)
            lineage = data.pop("lineage", {})
            return cls.from_metrics(data, gates, lineage)
        except FileNotFoundError:
            from tuneline.core.errors import StageFailed

            raise StageFailed(f"{path}: no evaluation report: run the evaluate stage first") from None
