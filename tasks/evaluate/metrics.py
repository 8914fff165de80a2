"""Classification metrics from logits: accuracy, loss, per-class precision/recall/F1, macro-F1, ECE, confusion.

Plain tensor arithmetic, no sklearn: a test of each number against hand-computed values lives in
tests/tasks/evaluate/test_metrics.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, the usual choice (Guo et al. 2017, "On Calibration of Modern NNs")


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts [n, n]: rows are the actual class, columns the predicted one."""
    counts = torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).cpu()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by the share of images in each."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur with softmax.
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(correct))
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    confident = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double())
    gap = (hits - confident).abs()  # per bin: |sum(correct) - sum(confidence)| = n_b * |acc_b - conf_b|
    return float(gap.sum() / max(len(labels), 1))


def per_class_scores(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(precision, recall, F1) per class; a class never predicted (or never present) scores 0, not NaN."""
    c = confusion.double()
    true_positive = c.diag()
    precision = true_positive / c.sum(0).clamp(min=1)
    recall = true_positive / c.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    return precision, recall, f1


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> tuple[dict, torch.Tensor]:
    """Every test metric the gates and the model card use, plus the confusion matrix (rows: actual)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    predicted = logits.argmax(1)
    confusion = confusion_matrix(predicted, labels, len(classes))
    precision, recall, f1 = per_class_scores(confusion)
    support = confusion.sum(1)
    present = support > 0  # macro averages over the classes the test set holds
    metrics = {
        "accuracy": round(float((predicted == labels).double().mean()), 6),
        "loss": round(float(F.cross_entropy(logits, labels)), 6),
        "n_test": int(labels.numel()),
        "macro_f1": round(float(f1[present].mean()), 6),
        "ece": round(expected_calibration_error(logits.softmax(1), labels), 6),
        "min_class_recall": round(float(recall[present].min()), 6),
        # = per-class recall; the key predates `per_class` and readers of eval.json use it
        "per_class_accuracy": {c: round(float(r), 6) for c, r in zip(classes, recall)},
        "per_class": {c: {"precision": round(float(p), 6), "recall": round(float(r), 6), "f1": round(float(f), 6),
                          "support": int(s)} for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
    }
    return metrics, confusion
