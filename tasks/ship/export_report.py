"""metrics/export.json, the export stage's report: one typed writer and reader for every consumer.

Written by the export stage (parity, ONNX accuracy, serving cost, variants, serving gates); read by the
promote step (model card) and the flow's summary through `ExportReport.read`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.core.atomic import write_bytes_atomic
from tuneline.tasks.evaluate.gate import GateVerdict


@dataclass(frozen=True)
class ExportReport:
    opset: int
    parity_max_abs_diff: dict[str, float]
    onnx_accuracy: float
    n_test: int
    serving: dict[str, Any]                                    # tuneline.tasks.ship.latency.measure_serving of model.onnx
    variants: dict[str, Any] = field(default_factory=dict)     # name -> VariantResult.to_dict()
    gates: list[GateVerdict] = field(default_factory=list)

    @property
    def gates_passed(self) -> bool:
        return all(v.passed for v in self.gates if v.blocking)

    def to_dict(self) -> dict[str, Any]:
        return {"opset": self.opset, "parity_max_abs_diff": self.parity_max_abs_diff,
                "onnx_accuracy": self.onnx_accuracy, "n_test": self.n_test, "serving": self.serving,
                "variants": self.variants, "gates": [v.to_dict() for v in self.gates],
                "gates_passed": self.gates_passed}

    def write(self, path: Path) -> None:
        write_bytes_atomic(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def read(cls, path: Path) -> ExportReport:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            from tuneline.core.errors import StageFailed

            raise StageFailed(f"{path}: no export report: run the export stage first") from None
        data.pop("gates_passed", None)
        gates = [GateVerdict.from_dict(g) for g in data.pop("gates", [])]
        return cls(**data, gates=gates)
