import csv
import json

import pytest
import torch

from tasks.config import GateConfig, TrainConfig
from tasks.evaluate import compute_metrics, run_evaluate
from tasks.gate import GateFailed, check_gates, markdown_table


def test_compute_metrics_on_known_predictions():
    labels = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0]), 3).float() * 10
    metrics, confusion = compute_metrics(logits, labels, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_gate_verdict_carries_value_threshold_and_margin():
    (verdict,) = check_gates({"accuracy": 0.97}, GateConfig(min_accuracy=0.99))
    assert not verdict.passed and verdict.margin == pytest.approx(-0.02)
    assert verdict.describe() == "gate gate.min_accuracy FAILED: test accuracy 0.9700 vs threshold 0.9900 (margin -0.0200)"
    assert "**FAIL**" in markdown_table([verdict])


def test_evaluate_writes_metrics_and_confusion_then_passes(tmp_path, small_checkpoint, small_prepared_dir):
    result = run_evaluate(small_checkpoint, small_prepared_dir, tmp_path / "eval.json", tmp_path / "confusion.csv",
                          GateConfig(min_accuracy=0.8), TrainConfig(device="cpu"))
    assert result.passed and result.metrics["n_test"] == 600
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["accuracy"] == result.metrics["accuracy"] >= 0.8
    assert saved["lineage"]["data_version"] == "abc123.dir"
    rows = list(csv.DictReader(open(tmp_path / "confusion.csv")))
    assert len(rows) == 600 and set(rows[0]) == {"actual", "predicted"}
    agree = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    assert agree == pytest.approx(saved["accuracy"])


def test_failed_gate_raises_after_writing_the_metrics(tmp_path, small_checkpoint, small_prepared_dir):
    with pytest.raises(GateFailed, match=r"gate gate.min_accuracy FAILED: test accuracy 0\.\d{4} vs threshold 0\.9990"):
        run_evaluate(small_checkpoint, small_prepared_dir, tmp_path / "eval.json", tmp_path / "c.csv",
                     GateConfig(min_accuracy=0.999), TrainConfig(device="cpu"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["gates_passed"] is False and saved["gates"][0]["threshold"] == 0.999
