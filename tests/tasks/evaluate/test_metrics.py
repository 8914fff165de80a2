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


def probs_of(confidence: float, predicted: int, n_classes: int = 4) -> list[float]:
    """A row whose top class is `predicted` with exactly `confidence` (a dyadic number: exact in float32)."""
    row = [(1 - confidence) / (n_classes - 1)] * n_classes
    row[predicted] = confidence
    return row


# (confidence, predicted, label), bins=4: (0, .25] (.25, .5] (.5, .75] (.75, 1]; 0.5, 0.75 and 1.0 lie on an edge.
ECE_CASE = [(0.5, 1, 1), (0.375, 2, 0), (0.375, 3, 1),      # (.25, .5]: 3 images, 1 right, confidences 1.25
            (0.75, 0, 2), (0.625, 1, 1),                    # (.5, .75]: 2 images, 1 right, confidences 1.375
            (1.0, 2, 2), (0.875, 3, 3), (0.875, 0, 0)]      # (.75, 1]:  3 images, 3 right, confidences 2.75
# (0, .25] is empty. ECE = sum_b n_b/N * |acc_b - conf_b| = (|1 - 1.25| + |1 - 1.375| + |3 - 2.75|) / 8
ECE_CASE_VALUE = (0.25 + 0.375 + 0.25) / 8  # 0.109375


def ece_case() -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([probs_of(c, p) for c, p, _ in ECE_CASE]),
            torch.tensor([label for _, _, label in ECE_CASE]))


def check_ece(ece) -> None:
    """What a correct ECE gives on the hand-computed cases; `ece(probs, labels, bins)`."""
    probs, labels = ece_case()
    assert ece(probs, labels, 4) == pytest.approx(ECE_CASE_VALUE, abs=1e-9)
    # One image, right, at exactly 1.0 (the top edge): perfectly calibrated, whatever the number of bins.
    assert ece(torch.tensor([probs_of(1.0, 2)]), torch.tensor([2]), 15) == pytest.approx(0.0, abs=1e-9)
    # Bins of different sizes and gaps, 15 bins: 0.5 x2 (1 right) -> 0; 0.75 x1 wrong -> 0.75; 1.0 x1 right -> 0.
    probs = torch.tensor([probs_of(0.5, 0), probs_of(0.5, 1), probs_of(0.75, 2), probs_of(1.0, 3)])
    assert ece(probs, torch.tensor([0, 0, 0, 3]), 15) == pytest.approx(0.75 / 4, abs=1e-9)


# Wrong formulas that a weaker test let through (issue 22): each must fail check_ece.
def _bins(confidence, bins, floor=False):
    if floor:  # [b/bins, (b+1)/bins): an edge lands one bin up
        return (confidence.double() * bins).floor().long().clamp(0, bins - 1)
    return (confidence.double() * bins).ceil().long().clamp(1, bins) - 1


def _per_bin(probs, labels, bins, floor=False, confidence=None):
    top, predicted = probs.max(1)
    confidence = top if confidence is None else confidence
    index = _bins(confidence, bins, floor)
    correct = (predicted == labels).double()
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(correct))
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    confident = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double())
    return count, hits, confident


def ece_unweighted_mean(probs, labels, bins):  # mean of |acc_b - conf_b| over the non-empty bins, not weighted
    count, hits, confident = _per_bin(probs, labels, bins)
    full = count > 0
    return float(((hits[full] - confident[full]).abs() / count[full]).mean())


def ece_max_gap(probs, labels, bins):  # the largest bin gap (that is MCE, not ECE)
    count, hits, confident = _per_bin(probs, labels, bins)
    full = count > 0
    return float(((hits[full] - confident[full]).abs() / count[full]).max())


def ece_floor_binning(probs, labels, bins):  # off by one at the edges: [b/bins, (b+1)/bins)
    count, hits, confident = _per_bin(probs, labels, bins, floor=True)
    return float((hits - confident).abs().sum() / len(labels))


def ece_true_class_probability(probs, labels, bins):  # the label's probability as the confidence, not the top one
    count, hits, confident = _per_bin(probs, labels, bins, confidence=probs.gather(1, labels[:, None])[:, 0])
    return float((hits - confident).abs().sum() / len(labels))


def ece_overall_accuracy(probs, labels, bins):  # the whole set's accuracy in every bin instead of the bin's own
    count, hits, confident = _per_bin(probs, labels, bins)
    return float((count * hits.sum() / len(labels) - confident).abs().sum() / len(labels))


def ece_signed_gaps(probs, labels, bins):  # no |.| per bin: over- and under-confidence cancel
    count, hits, confident = _per_bin(probs, labels, bins)
    return float((hits - confident).sum().abs() / len(labels))


WRONG_ECE = [ece_unweighted_mean, ece_max_gap, ece_floor_binning, ece_true_class_probability, ece_overall_accuracy,
             ece_signed_gaps]


def ece_by_definition(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    """ECE written out as its definition, a plain loop over (lo, hi] bins: the reference the stage's number is
    checked against (here and in test_evaluate.py)."""
    top, predicted = probs.double().max(1)
    confidence, right = top.tolist(), (predicted == labels).tolist()
    total = 0.0
    for b in range(bins):
        members = [i for i, c in enumerate(confidence) if b / bins < c <= (b + 1) / bins]
        if members:
            accuracy = sum(right[i] for i in members) / len(members)
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            total += len(members) / len(labels) * abs(accuracy - mean_confidence)
    return total


def test_ece_by_hand_on_unequal_bins_empty_bins_and_edges():
    check_ece(expected_calibration_error)
    check_ece(ece_by_definition)  # the hand-computed cases agree with the definition


@pytest.mark.parametrize("wrong", WRONG_ECE, ids=lambda f: f.__name__)
def test_each_wrong_ece_formula_fails_the_hand_computed_cases(wrong):
    probs, labels = ece_case()
    assert wrong(probs, labels, 4) != pytest.approx(ECE_CASE_VALUE, abs=1e-6)  # a different number on the case
    with pytest.raises(AssertionError):
        check_ece(wrong)


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
