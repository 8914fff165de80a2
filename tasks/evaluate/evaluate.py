"""Stage `evaluate`: checkpoint + test split -> metrics, confusion matrix (DVC plot + PNG) and gate verdicts.

Metrics (tuneline.tasks.evaluate.metrics: accuracy, macro-F1, per-class precision/recall, ECE) are written before the gates
are enforced, so a failed run still shows what the model reached.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from tuneline.core.atomic import staged_file
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.core.config.gate import GateConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.evaluate.gate import GateFailed, GateVerdict, check_gates
from tuneline.tasks.evaluate.metrics import compute_metrics
from tuneline.tasks.evaluate.plots import render_confusion_png
from tuneline.tasks.evaluate.report import EvalReport
from tuneline.tasks.data.stream import DataAccess, SplitReader
from tuneline.tasks.train.loop import predict_split, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    report: EvalReport   # what metrics_path holds
    metrics_path: Path
    confusion_path: Path

    @property
    def metrics(self) -> dict:
        return self.report.to_dict()

    @property
    def verdicts(self) -> list[GateVerdict]:
        return self.report.gates

    @property
    def passed(self) -> bool:
        return self.report.gates_passed


def run_evaluate(model_path: Path, prepared_dir: Path, metrics_path: Path, confusion_path: Path,
                 gate_cfg: GateConfig, train_cfg: TrainConfig, enforce: bool = True,
                 confusion_png: Path | None = None, access: DataAccess = DataAccess()) -> EvaluateResult:
    """Score the model on the test split, write metrics + confusion pairs (+ picture); GateFailed on a failed gate."""
    device = resolve_device(train_cfg.device)
    model, checkpoint = load_checkpoint(model_path, device)
    test = SplitReader(prepared_dir, "test", device, access)  # resident or streamed: data.resident_max_mb
    test.scoring_stage()
    logits, labels = predict_split(model, test, train_cfg.eval_batch_size)
    classes = checkpoint["classes"]
    metrics, confusion = compute_metrics(logits, labels, classes)
    verdicts = check_gates(metrics, gate_cfg)
    report = EvalReport.from_metrics(metrics, verdicts, checkpoint["lineage"])
    report.write(Path(metrics_path))
    # One row per test image: the layout DVC's confusion-matrix template expects.
    predicted = logits.argmax(1).cpu().tolist()
    with staged_file(Path(confusion_path)) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels.cpu().tolist(), predicted))
    if confusion_png is not None:
        render_confusion_png(confusion, classes, Path(confusion_png),
                             title=f"test accuracy {metrics['accuracy']:.4f} on {metrics['n_test']} images "
                                   "(rows: actual, columns: predicted)")
    log.info("evaluate: test accuracy %.4f, macro-F1 %.4f, ECE %.4f on %d images; %s", metrics["accuracy"],
             metrics["macro_f1"], metrics["ece"], metrics["n_test"], "; ".join(v.describe() for v in verdicts))
    if enforce and not report.gates_passed:
        raise GateFailed(verdicts)
    return EvaluateResult(report=report, metrics_path=Path(metrics_path), confusion_path=Path(confusion_path))
