"""The fast tier's run of the chain, in process, on the tiny synthetic data set (tests/conftest.py): prepare ->
train -> evaluate -> export -> registry -> a real server answering requests. (Fetch of an image folder: the
300-class test in test_prepare.py.)"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tuneline.tasks.data.prepare import load_manifest, load_split
from tuneline.tasks.ship.registry import Registry
from tests.conftest import TINY_CLASSES, TINY_COUNTS, label_of

pytestmark = pytest.mark.fast


def test_tiny_data_set_is_split_stratified_with_every_label_intact(tiny_prepared_dir):
    manifest = load_manifest(tiny_prepared_dir)
    assert manifest["classes"] == [f"c{k:03d}" for k in range(TINY_CLASSES)]
    assert manifest["counts"] == {"train": 917, "val": 83, "test": TINY_COUNTS["t10k"]}
    for split in ("train", "val", "test"):
        images, labels = load_split(tiny_prepared_dir, split)
        np.testing.assert_array_equal(labels.numpy(), label_of(images.numpy()[:, 0]))  # each image kept its own label
        assert set(labels.tolist()) == set(range(TINY_CLASSES))


def test_tiny_model_learns_and_exports_with_parity(tiny_onnx_model, tiny_checkpoint):
    folder = tiny_onnx_model.onnx_path.parent
    metrics = json.loads((folder / "eval.json").read_text())
    assert metrics["gates_passed"] is True and metrics["accuracy"] >= 0.9
    assert max(tiny_onnx_model.max_abs_diff.values()) <= 1e-4
    assert abs(tiny_onnx_model.onnx_accuracy - metrics["accuracy"]) <= 0.01
    metadata = {p.key: p.value for p in onnx.load(str(tiny_onnx_model.onnx_path)).metadata_props}
    assert json.loads(metadata["labels"]) == [f"c{k:03d}" for k in range(TINY_CLASSES)]
    assert metadata["data_version"] == "tiny.dir"
    report = json.loads((folder / "export.json").read_text())
    assert report["n_test"] == metrics["n_test"] and report["serving"]["latency_runs"] == 20


def test_tiny_model_registered_promoted_and_served(tiny_onnx_model, tiny_prepared_dir, tmp_path):
    from tuneline.serving.client import InferenceClient
    from tests.serving.conftest import run_server

    registry = Registry(tmp_path / "registry")
    version = registry.register({"model.onnx": tiny_onnx_model.onnx_path}, name="tiny", metrics={"accuracy": 0.9},
                                gates=[], lineage={"data_version": "tiny.dir"}, run_id="tiny-run")
    registry.promote(version)
    images, labels = load_split(tiny_prepared_dir, "test")
    images = images[:32].numpy()
    with run_server(tmp_path / "registry", threads=1) as server, InferenceClient(server.url) as client:
        result = client.infer(images)
    assert result.model_name == "tiny" and result.model_version == version == "v0001"
    predicted = np.asarray(result.outputs["class"]).reshape(-1)
    assert (predicted == labels[:32].numpy()).mean() >= 0.8
