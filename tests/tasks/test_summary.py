"""The run summary as a reader sees it: links that open, rounded numbers, params as tables, the pictures shown."""

from __future__ import annotations

import base64
import csv
import json
import re
from urllib.parse import unquote

import pytest
import torch

from tuneline.core.config.params import build_params
from tuneline.core.registry_layout import RegistryTree
from tuneline.tasks.evaluate.plots import render_confusion_png
from tuneline.tasks.summary import render_summary
from tuneline.tasks.train.curves import render_curves_png
from tuneline.tasks.tune.results import tuning_summary

pytestmark = pytest.mark.fast

LR = 0.002673375196167578      # a tuned value as Optuna samples it: 19 significant digits
DROPOUT = 0.37481278151973657


def markdown_links(markdown: str) -> list[str]:
    """Every link and image target in `markdown`: [text](target) and ![alt](target)."""
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


@pytest.fixture()
def run(tmp_path):
    """A project folder as a run leaves it: history, both pictures, the ONNX file, a registered card, a study."""
    params = build_params({}, {"train.lr": LR, "model.dropout": DROPOUT})
    paths = params.paths.resolve(tmp_path)
    paths.history.parent.mkdir(parents=True)
    paths.summary.parent.mkdir(parents=True)  # where the file is written, which the links start from
    history = [{"epoch": 1, "train_loss": 0.1223191, "val_loss": 0.0511781, "val_accuracy": 0.98383, "lr": LR,
                "seconds": 19.82213, "images_per_s": 2774.71},
               {"epoch": 2, "train_loss": 0.0329121, "val_loss": 0.0409113, "val_accuracy": 0.98781, "lr": LR / 2,
                "seconds": 18.34312, "images_per_s": 2998.52}]
    with open(paths.history, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    render_curves_png(history, paths.train_curves_png)
    render_confusion_png(torch.tensor([[5, 1], [0, 4]]), ["cat", "dog"], paths.confusion_png)
    paths.onnx.parent.mkdir(parents=True)
    paths.onnx.write_bytes(b"onnx")
    card = RegistryTree(paths.registry).model("mnist").card_path("v0001")
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"files": {}}))
    paths.tuning.mkdir()
    (paths.tuning / "history.html").write_text("<html></html>")
    (paths.tuning / "best_params.json").write_text(json.dumps({
        "enabled": True, "study": "tuneline-mnist-full-seed_cnn-b6a460696312", "value": 0.97351234,
        "params": {"train.lr": LR, "model.dropout": DROPOUT}, "states": {"COMPLETE": 2, "PRUNED": 1},
        "plots": {"history": "history.html"}}))
    (paths.tuning / "trials.csv").write_text(f"number,value,state,duration_s,train.lr,model.dropout\n"
                                             f"0,0.97351234,COMPLETE,4.3812,{LR},{DROPOUT}\n")
    summary = {"accuracy": 0.99351234, "gates_passed": True, "data_version": "839b.dir", "params_hash": "73e4",
               "git_commit": "d2eab4b", "onnx_path": str(paths.onnx), "stages": {"train": "ran"},
               "macro_f1": 0.99342, "ece": 0.00181,
               "serving": {"provider": "CPUExecutionProvider", "latency_p50_ms": 0.16423456,
                           "latency_p99_ms": 0.26791234, "throughput_images_per_s": 8958.31, "throughput_batch": 256,
                           "size_bytes": 4471013},
               "version": "v0001", "champion": "v0001", "promotion": "v0001 promoted to champion",
               "registry_path": str(paths.registry), "model_name": "mnist", "tuning": tuning_summary(paths.tuning)}
    return params, paths, summary


def test_every_link_in_the_summary_file_opens_a_file_from_the_reports_folder(run):
    params, paths, summary = run
    markdown = render_summary(params, summary, [], paths, "dvc push: 8 file(s)")
    links = markdown_links(markdown)
    folder = paths.summary.parent
    assert all((folder / unquote(link)).exists() for link in links), links
    # The card where the registry keeps it (by model name), not the single-model registry's versions/v0001/.
    assert "../registry/models/mnist/versions/v0001/card.json" in links
    assert {"../models/model.onnx", "../tuning/history.html"} <= set(links)
    assert not any(link.startswith(("/", "file:")) for link in links)  # relative: they survive moving the project


def test_numbers_are_rounded_and_params_are_tables_with_the_tuned_values_marked(run):
    params, paths, summary = run
    markdown = render_summary(params, summary, [], paths, "")
    assert not re.search(r"\d\.\d{7,}", markdown), re.findall(r".*\d\.\d{7,}.*", markdown)
    assert "**test accuracy**: 0.9935" in markdown
    assert "p50 0.164 ms, p99 0.268 ms at batch 1; 8958 images/s" in markdown
    assert "3 trials: 2 complete, 1 pruned; best val accuracy 0.9735 with `train.lr` 0.002673" in markdown
    assert "| 1 | 0.1223 | 0.0512 | 0.9838 | 0.002673 | 19.8 | 2775 |" in markdown  # the history, rounded
    assert "| `lr` | **0.002673** (tuned) |" in markdown and "| `dropout` | **0.3748** (tuned) |" in markdown
    assert "| `optimizer` | adamw |" in markdown and "| `kwargs` | {} |" in markdown  # as given: not marked
    assert "**model**\n\n| key | value |\n|---|---|\n| `arch` | lean_cnn |" in markdown
    assert "{'" not in markdown  # no Python dict dumps


def test_the_file_shows_the_pictures_and_the_artifact_embeds_them(run):
    params, paths, summary = run
    markdown = render_summary(params, summary, [], paths, "")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert images == ["../metrics/confusion.png", "../metrics/train_curves.png"]
    artifact = render_summary(params, summary, [], paths, "", inline_images=True)
    embedded = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([^)]+)\)", artifact)
    assert [base64.b64decode(data) for data in embedded] == [paths.confusion_png.read_bytes(),
                                                             paths.train_curves_png.read_bytes()]
    # The Prefect UI cannot open local files: no link there points at one; files are named by their path.
    assert all(link.startswith("data:image/png") for link in markdown_links(artifact))
    assert f"`{paths.onnx}`" in artifact


def test_a_missing_picture_or_card_is_left_out_rather_than_linked(run):
    params, paths, summary = run
    paths.train_curves_png.unlink()
    RegistryTree(paths.registry).model("mnist").card_path("v0001").unlink()
    markdown = render_summary(params, summary, [], paths, "")
    assert "train_curves.png" not in markdown and "![confusion matrix" in markdown
    assert all((paths.summary.parent / unquote(link)).exists() for link in markdown_links(markdown))
