"""Bring your own network: a factory defined in this test file (`module:function`) and a torchvision
architecture (`torchvision:NAME`), each trained on a tiny RGB data set, exported, registered under its own
name and answered by the real server (V2 JSON with the model's declared shape, and /classify by class name)."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tuneline.core.config.model import ModelConfig
from tuneline.tasks.ship.registry import Registry
from tests.serving.conftest import converted_upload, reference_logits, run_server
from tests.tasks.ship.synthetic_models import synthetic_images, train_and_export, write_prepared

CLASSES = ["red", "green", "blue", "white"]


def tiny_net(n_classes: int, in_channels: int, image_size: tuple[int, int], dropout: float, width: int = 8) -> nn.Module:
    """The user's factory: normalised [N, C, H, W] -> logits (what docs/models.md asks of one)."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * 4, n_classes))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("rgb") / "prepared", 3, 16, CLASSES)


@pytest.mark.parametrize(("name", "model"), [
    ("mine", ModelConfig(arch=f"{__name__}:tiny_net", dropout=0.0, kwargs={"width": 12})),
    ("resnet", ModelConfig(arch="torchvision:resnet18", dropout=0.0)),
])
def test_a_user_factory_and_a_torchvision_model_go_from_training_to_the_server(tmp_path, prepared, name, model):
    torch.manual_seed(0)
    exported = train_and_export(prepared, tmp_path / "model", name, epochs=3, model=model)
    meta = exported.metadata
    assert meta["model_name"] == name and model.arch in meta["model_args"]
    registry = Registry(tmp_path / "registry", name)
    registry.promote(registry.register({"model.onnx": exported.onnx_path}, metrics={"accuracy": 1.0}, gates=[],
                                       lineage={}, run_id=None))
    labels = np.arange(len(CLASSES))
    images = synthetic_images(labels, 3, 16, np.random.default_rng(3))  # one fresh image per class
    with run_server(tmp_path / "registry") as running:
        declared = httpx.get(f"{running.url}/v2/models/{name}").json()["inputs"][0]["shape"]
        assert declared == [-1, 3, 16, 16]
        body = {"inputs": [{"name": "pixels", "shape": [4, *declared[1:]], "datatype": "UINT8",
                            "data": images.ravel().tolist()}]}
        answer = httpx.post(f"{running.url}/v2/models/{name}/infer", json=body)
        assert answer.status_code == 200, answer.text
        predicted = answer.json()["outputs"][2]["data"]
        assert sum(p == t for p, t in zip(predicted, labels.tolist())) >= 3, predicted  # it learnt the colours
        # Each class is the file's own answer: ONNX Runtime run directly on the exported file, same input.
        assert predicted == reference_logits(exported.onnx_path, images).argmax(1).tolist()
        picture = io.BytesIO()
        Image.fromarray(images[1].transpose(1, 2, 0)).resize((48, 48), Image.Resampling.NEAREST).save(picture, "PNG")
        classified = httpx.post(f"{running.url}/classify", files={"file": ("x.png", picture.getvalue())}).json()
        logits = reference_logits(exported.onnx_path, converted_upload(picture.getvalue(), "RGB", (16, 16)))[0]
        expected = int(logits.argmax())
        assert (classified["class"], classified["label"]) == (expected, CLASSES[expected]), classified
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert np.allclose([classified["probabilities"][c] for c in CLASSES], probabilities, atol=1e-4)
