import csv
import json
import pickle

import pytest
import torch

from tuneline.core.config.gate import GateConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.evaluate.evaluate import compute_metrics, run_evaluate
from tuneline.tasks.evaluate.gate import GateFailed, check_champion_gates, check_gates, markdown_table
from tuneline.tasks.evaluate.metrics import ECE_BINS
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.tasks.train.loop import predict_logits
from tests.tasks.evaluate.test_metrics import ece_by_definition


@pytest.mark.fast
def test_compute_metrics_on_known_predictions():
    labels = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0]), 3).float() * 10
    metrics, confusion = compute_metrics(logits, labels, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


@pytest.mark.fast
def test_gate_verdict_carries_value_threshold_and_margin():
    verdicts = check_gates({"accuracy": 0.97, "min_class_recall": 0.95, "ece": 0.05},
                           GateConfig(min_accuracy=0.99, min_class_recall=0.9, max_ece=0.03))
    verdict, recall, ece = verdicts
    assert not verdict.passed and verdict.margin == pytest.approx(-0.02)
    assert verdict.describe() == "gate gate.min_accuracy FAILED: test accuracy 0.9700 vs threshold 0.9900 (margin -0.0200)"
    assert "**FAIL**" in markdown_table([verdict])
    assert recall.passed and recall.margin == pytest.approx(0.05)
    # An upper bound: the margin is threshold - value, negative when the value is too high.
    assert not ece.passed and ece.direction == "max" and ece.margin == pytest.approx(-0.02)
    assert ece.describe() == ("gate gate.max_ece FAILED: expected calibration error 0.0500 vs threshold 0.0300 "
                              "(margin -0.0200)")
    assert "| ≤ 0.0300 | -0.0200 | **FAIL** |" in markdown_table(verdicts)


@pytest.mark.fast
def test_champion_gates_block_a_regression_and_decide_promotion():
    cfg = GateConfig(max_regression=0.005, min_improvement=0.001)
    regression, improvement = check_champion_gates(0.950, 0.958, cfg)
    assert not regression.passed and regression.blocking and regression.margin == pytest.approx(-0.003)
    assert not improvement.passed and not improvement.blocking  # a decision (not promoted), not a failed run
    error = GateFailed([regression, improvement], consequence="nothing is promoted")
    # One line (a flow run's state message); the table is the error's details, which the CLI prints after it.
    assert str(error) == ("gate gate.max_regression FAILED: accuracy change vs champion -0.0080 vs threshold "
                          "-0.0050 (margin -0.0030): nothing is promoted")
    row = "| `gate.min_improvement` | accuracy change vs champion | -0.0080 | ≥ 0.0010 | -0.0090 | not met |"
    assert error.details.startswith("| gate |") and row in error.details
    copy = pickle.loads(pickle.dumps(error))  # as Prefect persists a failed task's exception
    assert str(copy) == str(error) and copy.details == error.details
    regression, improvement = check_champion_gates(0.962, 0.958, cfg)
    assert regression.passed and improvement.passed


def test_evaluate_writes_metrics_and_confusion_then_passes(tmp_path, small_checkpoint, small_prepared_dir):
    result = run_evaluate(small_checkpoint, small_prepared_dir, tmp_path / "eval.json", tmp_path / "confusion.csv",
                          GateConfig(min_accuracy=0.8, min_class_recall=0.5, max_ece=0.2), TrainConfig(device="cpu"),
                          confusion_png=tmp_path / "confusion.png")
    assert result.passed and result.metrics["n_test"] == 600
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [g["name"] for g in result.metrics["gates"]]
    assert names == ["gate.min_accuracy", "gate.min_class_recall", "gate.max_ece"]
    assert result.metrics["min_class_recall"] == min(c["recall"] for c in result.metrics["per_class"].values())
    # ECE and macro-F1 exactly: recomputed from the model's logits and from the written confusion pairs, by the
    # definitions (gate.max_ece decides shipping, so a range check would let a wrong formula through).
    model, checkpoint = load_checkpoint(small_checkpoint, "cpu")
    images, labels = load_split(small_prepared_dir, "test")
    probs = predict_logits(model, images, TrainConfig().eval_batch_size).softmax(1)
    assert result.metrics["ece"] == pytest.approx(ece_by_definition(probs, labels, ECE_BINS), abs=1e-6)
    assert result.metrics["ece"] < 0.2  # the gate above passed on it
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["accuracy"] == result.metrics["accuracy"] >= 0.8
    assert saved["lineage"]["data_version"] == "abc123.dir"
    rows = list(csv.DictReader(open(tmp_path / "confusion.csv")))
    assert len(rows) == 600 and set(rows[0]) == {"actual", "predicted"}
    agree = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    assert agree == pytest.approx(saved["accuracy"])
    f1 = []
    for name in checkpoint["classes"]:  # every class is in the slice's test split
        hits = sum(r["actual"] == r["predicted"] == name for r in rows)
        precision = hits / max(sum(r["predicted"] == name for r in rows), 1)
        recall = hits / sum(r["actual"] == name for r in rows)
        f1.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    assert saved["macro_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-6)


def test_failed_gate_raises_after_writing_the_metrics(tmp_path, small_checkpoint, small_prepared_dir):
    with pytest.raises(GateFailed, match=r"gate gate.min_accuracy FAILED: test accuracy 0\.\d{4} vs threshold 0\.9990"):
        run_evaluate(small_checkpoint, small_prepared_dir, tmp_path / "eval.json", tmp_path / "c.csv",
                     GateConfig(min_accuracy=0.999), TrainConfig(device="cpu"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["gates_passed"] is False and saved["gates"][0]["threshold"] == 0.999
