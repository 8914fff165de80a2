"""Stage `evaluate`: checkpoint + test split -> metrics, confusion matrix and gate verdicts.

Metrics are written before the gates are enforced, so a failed run still shows what the model reached.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.atomic import staged_file, write_bytes_atomic
from tasks.checkpoint import load_checkpoint
from tasks.config import GateConfig, TrainConfig
from tasks.gate import GateFailed, GateVerdict, check_gates
from tasks.prepare import load_split
from tasks.train import predict_logits, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    verdicts: list[GateVerdict]
    metrics_path: Path
    confusion_path: Path

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> tuple[dict, torch.Tensor]:
    """Accuracy, loss, per-class accuracy and the confusion matrix (rows: actual, columns: predicted)."""
    predicted = logits.argmax(1)
    n = len(classes)
    confusion = torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n).cpu()
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    metrics = {
        "accuracy": round(float((predicted == labels).double().mean()), 6),
        "loss": round(float(F.cross_entropy(logits.float(), labels)), 6),
        "n_test": int(labels.numel()),
        "per_class_accuracy": {c: round(float(a), 6) for c, a in zip(classes, per_class)},
    }
    return metrics, confusion


def run_evaluate(model_path: Path, prepared_dir: Path, metrics_path: Path, confusion_path: Path,
                 gate_cfg: GateConfig, train_cfg: TrainConfig, enforce: bool = True) -> EvaluateResult:
    """Score the model on the test split, write metrics + confusion pairs, then raise GateFailed on a failure."""
    device = resolve_device(train_cfg.device)
    model, checkpoint = load_checkpoint(model_path, device)
    images, labels = (t.to(device) for t in load_split(prepared_dir, "test"))
    logits = predict_logits(model, images, train_cfg.eval_batch_size)
    classes = checkpoint["classes"]
    metrics, confusion = compute_metrics(logits, labels, classes)
    verdicts = check_gates(metrics, gate_cfg)
    metrics["gates"] = [v.to_dict() for v in verdicts]
    metrics["gates_passed"] = all(v.passed for v in verdicts)
    metrics["lineage"] = checkpoint["lineage"]
    write_bytes_atomic(Path(metrics_path), (json.dumps(metrics, indent=2) + "\n").encode())
    # One row per test image: the layout DVC's confusion-matrix template expects.
    predicted = logits.argmax(1).cpu().tolist()
    with staged_file(Path(confusion_path)) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels.cpu().tolist(), predicted))
    log.info("evaluate: test accuracy %.4f on %d images; %s", metrics["accuracy"], metrics["n_test"],
             "; ".join(v.describe() for v in verdicts))
    if enforce and not metrics["gates_passed"]:
        raise GateFailed(verdicts)
    return EvaluateResult(metrics=metrics, verdicts=verdicts, metrics_path=Path(metrics_path),
                          confusion_path=Path(confusion_path))
