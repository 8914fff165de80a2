"""Captured traffic as a data source (`data.source: capture`): the server's capture-*.jsonl rows with a feedback
label become the data set; fetch and prepare read them as they read any source, the champion is re-evaluated on
them, and the run summary reports how many requests were captured, how many labelled, from which versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tuneline.core.config.base import ConfigError
from tuneline.core.config.params import build_params
from tuneline.flows import stages
from tuneline.tasks.data.capture import REPORT_FILE, CaptureReport
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.data.stream import SplitReader
from tuneline.tasks.ship.latency import split_accuracy
from tuneline.tasks.ship.registry import Registry
from tuneline.tasks.summary import render_summary
from tests.conftest import label_of

pytestmark = pytest.mark.fast

CAPTURED, LABELLED = 120, 90   # rows of the served model; of them, with a (valid) feedback label


def write_jsonl(path: Path, rows: list[dict], cut_short: str = "") -> None:
    """JSON lines as the server writes them; `cut_short`: a last line the writer did not finish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + cut_short)


@pytest.fixture
def captured(tmp_path, tiny_onnx_model, tiny_prepared_dir):
    """A project whose registry serves `tiny` (v0001 champion, v0002 challenger: the same file) and whose capture
    folder holds 120 requests of it (as the graph took them: float pixels [1, 28, 28]) in two files, 80 answered
    by v0001 and 40 by v0002, plus 5 of another model, and feedback labels for 91 of tiny's (one naming no class),
    with a line cut short at the end of a capture file and of the feedback file."""
    registry = Registry(tmp_path / "registry", "tiny")
    for _ in range(2):
        registry.register({"model.onnx": tiny_onnx_model.onnx_path}, metrics={}, gates=[], lineage={}, run_id=None)
    registry.promote("v0001", by="pipeline", reason="first")
    images, labels = load_split(tiny_prepared_dir, "test")
    images, labels = images.numpy(), labels.numpy()

    def row(i: int, model: str = "tiny") -> dict:
        return {"id": f"{i:032x}" if model == "tiny" else f"{model}-{i}", "time": f"2026-05-01T10:{i // 60:02d}:{i % 60:02d}.000+00:00", "model": model,
                "version": "v0001" if i < 80 else "v0002", "modality": "image",
                "input": images[i].astype(np.float32).tolist(), "shape": list(images[i].shape),
                "class": int(labels[i]), "probability": 0.99}

    folder = tmp_path / ".tuneline" / "capture"
    write_jsonl(folder / "capture-0002.jsonl", [row(i) for i in range(60, CAPTURED)], cut_short='{"id": "ff", "inp')
    write_jsonl(folder / "capture-0001.jsonl", [row(i) for i in range(60)] + [row(i, "digits") for i in range(5)])
    feedback = [{"id": f"{i:032x}", "label": int(labels[i])} for i in range(LABELLED)]
    feedback += [{"id": f"digits-{i}", "label": 1} for i in range(5)]  # another model's: not this data set
    feedback.append({"id": f"{LABELLED:032x}", "label": 42})   # names no class of the model: ignored, counted
    write_jsonl(folder / "feedback-0001.jsonl", feedback, cut_short='{"id": "00')
    params = build_params({}, {"data.source": "capture", "data.capture_model": "tiny", "data.val_fraction": 0.1})
    return tmp_path, params, tiny_onnx_model.onnx_path


def test_captured_requests_with_labels_are_fetched_prepared_evaluated_and_summarised(captured):
    root, params, champion = captured
    fetched = stages.fetch(params, root)
    assert fetched.counts == {"all": LABELLED} and fetched.source == "capture:tiny"
    report = CaptureReport.read(root / "data" / "raw")
    assert (report.rows, report.labelled, report.unlabelled) == (CAPTURED, LABELLED, CAPTURED - LABELLED)
    assert report.versions == {"v0001": {"rows": 80, "labelled": 80}, "v0002": {"rows": 40, "labelled": 10}}
    assert (report.skipped_lines, report.invalid_labels) == (2, 1)
    assert json.loads((root / "data" / "raw" / "classes.json").read_text()) == [f"c{k:03d}" for k in range(10)]

    prepared = stages.prepare(params, root)
    assert sum(prepared.counts.values()) == LABELLED
    for split in ("train", "val", "test"):  # every pixel came back exactly, joined to its own feedback label
        images, labels = load_split(root / "data" / "prepared", split)
        assert np.array_equal(label_of(images.numpy()[:, 0]), labels.numpy())
    assert prepared.manifest["classes"] == [f"c{k:03d}" for k in range(10)]

    # The champion re-evaluated on the captured test split (what a run's promote does with it).
    test = SplitReader(root / "data" / "prepared", "test", "cpu")
    assert split_accuracy(champion, test) >= 0.9

    assert params.project.resolve_name(params.data) == "tiny"  # a retrained model challenges the served one
    paths = params.paths.resolve(root)
    summary = {"accuracy": 0.97, "gates_passed": True, "data_version": "abc.dir", "params_hash": "p", "git_commit": "c",
               "onnx_path": str(champion), "stages": {"fetch": "ran", "prepare": "ran"}}
    markdown = render_summary(params, summary, [], paths, "dvc push: skipped")
    assert (f"- **captured traffic**: {CAPTURED} captured requests of tiny (v0001: 80, 80 labelled; v0002: 40, 10 "
            f"labelled), {LABELLED} with a feedback label (the data set), {CAPTURED - LABELLED} without (not used); "
            "2 unreadable line(s) skipped, 1 label(s) naming no class ignored") in markdown


def test_normalised_or_misshapen_inputs_are_refused_with_the_row(captured):
    root, params, _ = captured
    path = root / ".tuneline" / "capture" / "capture-0001.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pixels = np.asarray(rows[3]["input"])
    rows[3]["input"] = ((pixels / 255.0 - 0.1307) / 0.3081).tolist()  # as a server that normalised would capture
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=f"capture capture-0001.jsonl id {rows[3]['id']}: values -0.424..2.8.* are "
                                        "not pixels 0..255"):
        stages.fetch(params, root)
    rows[3]["input"] = pixels.tolist()[0][:20]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"input shape \[20, 28\], the model takes \[1, 28, 28\]"):
        stages.fetch(params, root)
    assert not (root / "data" / "raw" / REPORT_FILE).exists()  # a failed fetch leaves nothing half-written


def test_no_labels_yet_and_config_errors_say_what_to_do(captured, tmp_path):
    root, params, _ = captured
    for path in (root / ".tuneline" / "capture").glob("feedback-*"):
        path.unlink()
    with pytest.raises(DataError, match="120 captured requests of tiny .* 0 with a feedback label .*send true labels"):
        stages.fetch(params, root)
    with pytest.raises(ConfigError, match="set data.capture_model"):
        build_params({}, {"data.source": "capture"})
    with pytest.raises(ConfigError, match="data.capture_model applies to source=capture only"):
        build_params({}, {"data.capture_model": "tiny"})
