"""Each metric against numbers worked out by hand, and the confusion picture."""

import pytest
import torch
from PIL import Image

from tuneline.tasks.evaluate.metrics import compute_metrics, expected_calibration_error, per_class_scores
from tuneline.tasks.evaluate.plots import render_confusion_png

pytestmark = pytest.mark.fast


def test_precision_recall_f1_and_macro_f1_by_hand():
    # actual:    0 0 0 1 1 2      predicted: 0 0 1 1 2 2
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float() * 20
    metrics, confusion = compute_metrics(logits, labels, ["a", "b", "c"])
    assert confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    per_class = metrics["per_class"]
    assert per_class["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3, abs=1e-6), "f1": 0.8, "support": 3}
    assert per_class["b"]["precision"] == 0.5 and per_class["b"]["recall"] == 0.5 and per_class["b"]["f1"] == 0.5
    assert per_class["c"]["precision"] == 0.5 and per_class["c"]["recall"] == 1.0
    assert per_class["c"]["f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3, abs=1e-6)
    assert metrics["min_class_recall"] == 0.5 and metrics["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert metrics["per_class_accuracy"] == {"a": pytest.approx(2 / 3, abs=1e-6), "b": 0.5, "c": 1.0}


def test_a_class_never_predicted_scores_zero_not_nan():
    precision, recall, f1 = per_class_scores(torch.tensor([[3, 0], [2, 0]]))
    assert precision.tolist() == [0.6, 0.0] and recall.tolist() == [1.0, 0.0] and f1[1].item() == 0.0


def test_ece_by_hand():
    # Two confident-and-right images at 0.9 (bin 14: |1.0 - 0.9| = 0.1) and two at 0.6 of which one is right
    # (bin 9: |0.5 - 0.6| = 0.1): ECE = (2 * 0.1 + 2 * 0.1) / 4 = 0.1.
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.1)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == 0.0


def test_confusion_picture(tmp_path):
    confusion = torch.tensor([[50, 2, 0], [1, 40, 9], [0, 0, 30]])
    path = render_confusion_png(confusion, ["a", "b", "c"], tmp_path / "confusion.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 3 * 40
    assert len(set(image.convert("RGB").getdata())) > 10  # shaded cells and text, not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]  # written atomically, no temp left


def test_a_confusion_picture_of_two_classes_shows_its_whole_title(tmp_path):
    path = render_confusion_png(torch.tensor([[5, 1], [0, 4]]), ["cat", "dog"], tmp_path / "confusion.png",
                                title="test accuracy 0.9000 on 10 images (rows: actual, columns: predicted)")
    image = Image.open(path).convert("L")
    title_strip = image.crop((image.width - 8, 0, image.width, 20))  # the title's line, at the right edge
    assert min(title_strip.getdata()) > 200  # background only: the title ends before the edge, not cut by it


def test_a_confusion_picture_of_300_classes_stays_small(tmp_path):
    # A 44-pixel cell per class would be a 13,000-pixel square (≈0.5 GB in memory) for 300 classes.
    confusion = torch.eye(300, dtype=torch.long) * 5
    path = render_confusion_png(confusion, [f"class{i}" for i in range(300)], tmp_path / "confusion.png")
    width, height = Image.open(path).size
    assert width == height <= 2000
