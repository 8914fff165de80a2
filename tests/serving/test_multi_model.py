"""The server serves any input spec and every model name in the registry: an RGB model next to MNIST, each under
its own name, serve.model limiting it to one, and an old single-model registry served and then migrated."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tuneline.serving.client import InferenceClient
from tuneline.tasks.ship.registry import Registry
from tests.serving.conftest import converted_upload, reference_logits, run_server, wait_until
from tests.serving.registry_helper import make_registry, register_version, set_alias
from tests.tasks.ship.synthetic_models import synthetic_images, train_and_export, write_prepared

CLASSES = ["cat", "dog", "ship", "frog"]


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory) -> Path:
    """seed_cnn on a synthetic 3x12x12 RGB data set of 4 named classes, exported as model 'shapes'."""
    base = tmp_path_factory.mktemp("shapes")
    prepared = write_prepared(base / "prepared", 3, 12, CLASSES)
    return train_and_export(prepared, base / "model", "shapes").onnx_path


def _register(root: Path, name: str, model: Path) -> str:
    registry = Registry(root, name)
    version = registry.register({"model.onnx": model}, metrics={"accuracy": 1.0}, gates=[], lineage={}, run_id=None)
    registry.promote(version)
    return version


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _upscaled(image_chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One [3, 12, 12] image as an HxWx3 picture of another size (what a user uploads)."""
    return np.asarray(Image.fromarray(image_chw.transpose(1, 2, 0)).resize(size, Image.Resampling.NEAREST))


def test_an_rgb_model_is_served_with_its_own_shape_and_class_names(tmp_path, shapes_model):
    root = tmp_path / "registry"
    _register(root, "shapes", shapes_model)
    rng = np.random.default_rng(7)
    labels = np.arange(4)
    images = synthetic_images(labels, 3, 12, rng)  # uint8 [4, 3, 12, 12], one per class
    with run_server(root) as running:
        meta = httpx.get(running.url + "/v2/models/shapes").json()
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 12, 12]}]
        assert meta["labels"] == CLASSES and meta["input_spec"]["channels"] == 3
        assert meta["outputs"][0]["shape"] == [-1, 4]
        # A standard V2 JSON request with the declared shape, and the flat form.
        for shape in ([4, 3, 12, 12], [4, 432]):
            body = {"inputs": [{"name": "pixels", "shape": shape, "datatype": "UINT8", "data": images.ravel().tolist()}]}
            answer = httpx.post(running.url + "/v2/models/shapes/infer", json=body).json()
            assert answer["model_name"] == "shapes" and answer["outputs"][2]["data"] == labels.tolist(), answer
        wrong = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
        refused = httpx.post(running.url + "/v2/models/shapes/infer", json=wrong)
        assert refused.status_code == 400 and "expected [N, 3, 12, 12] or [N, 432]" in refused.json()["error"]
        # /classify: a colour PNG of another size, converted as prepare converts; the answer names the class.
        for label in labels:
            picture = _png(_upscaled(images[label], (40, 30)))
            answer = httpx.post(running.url + "/classify?top_k=3", files={"file": ("x.png", picture)}).json()
            assert answer["label"] == CLASSES[label] and answer["class"] == label, answer
            assert [c["label"] for c in answer["top_k"]][0] == CLASSES[label] and len(answer["top_k"]) == 3
            assert set(answer["probabilities"]) == set(CLASSES)
        # A gray upload of another size: made RGB and resized as prepare would; the class is what ONNX Runtime
        # gives on the file for that picture (one gray image of a colour class need not be that class).
        gray = _png(np.asarray(Image.fromarray(_upscaled(images[0], (24, 24))).convert("L")))
        expected = int(reference_logits(shapes_model, converted_upload(gray, "RGB", (12, 12))).argmax())
        answer = httpx.post(running.url + "/classify", files={"file": ("g.png", gray)}).json()
        assert (answer["class"], answer["label"]) == (expected, CLASSES[expected]), answer
        # The client follows the model's metadata: channels-last images (as PIL gives them) are fine.
        with InferenceClient(running.url) as client:
            result = client.infer(images.transpose(0, 2, 3, 1))
            assert result.outputs["class"].tolist() == labels.tolist() and client.model == "shapes"
            assert client.classify(_png(_upscaled(images[2], (12, 12))), top_k=2)["label"] == "ship"


def test_every_model_name_is_served_and_serve_model_limits_it_to_one(tmp_path, shapes_model, onnx_model, digits):
    root = tmp_path / "registry"
    _register(root, "mnist", onnx_model)
    _register(root, "shapes", shapes_model)
    mnist_request = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                                 "data": digits.images[0].ravel().tolist()}]}
    with run_server(root) as running:
        wait_until(lambda: all(s.champion for s in running.holder.slots.values()), what="both champions")
        index = httpx.post(running.url + "/v2/repository/index").json()
        assert {(e["name"], e["version"], e["state"]) for e in index} == {("mnist", "v0001", "READY"),
                                                                          ("shapes", "v0001", "READY")}
        answer = httpx.post(running.url + "/v2/models/mnist/infer", json=mnist_request).json()
        assert answer["outputs"][2]["data"] == [int(digits.classes[0])]
        assert httpx.get(running.url + "/v2/models/shapes").json()["inputs"][0]["shape"] == [-1, 3, 12, 12]
        several = httpx.post(running.url + "/classify", files={"file": ("d.png", _png(digits.images[0]))})
        assert several.status_code == 400 and "serves several models (mnist, shapes)" in several.json()["error"]
        named = httpx.post(running.url + "/classify?model=mnist", files={"file": ("d.png", _png(digits.images[0]))})
        assert named.json()["label"] == str(digits.classes[0])
        with pytest.raises(Exception, match="pass model="):
            InferenceClient(running.url).infer(digits.images[:1])
        reload = httpx.post(running.url + "/v2/repository/models/shapes/load").json()
        assert reload["name"] == "shapes" and reload["role"] == "champion"
    with run_server(root, model="shapes") as running:
        assert httpx.get(running.url + "/v2/models/mnist").status_code == 404
        assert "limited to it by serve.model" in httpx.get(running.url + "/v2/models/mnist").json()["error"]
        assert {e["name"] for e in httpx.post(running.url + "/v2/repository/index").json()} == {"shapes"}
        assert httpx.post(running.url + "/classify", files={"file": ("d.png", _png(digits.images[0]))}).status_code == 200


def test_an_old_single_model_registry_is_served_and_keeps_serving_through_its_migration(tmp_path, shapes_model,
                                                                                         onnx_model, other_model,
                                                                                         digits):
    # versions/ and aliases/ at the top, cards named mnist: v0001 other weights, v0002 (champion) the digits model
    root = make_registry(tmp_path, other_model.path)
    set_alias(root, register_version(root, onnx_model))
    request = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                           "data": digits.images[0].ravel().tolist()}], "outputs": [{"name": "logits"}]}
    with run_server(root) as running:
        assert httpx.post(running.url + "/v2/models/mnist/infer", json=request).json()["model_version"] == "v0002"
        _register(root, "shapes", shapes_model)  # the first write moves mnist under models/mnist/
        assert (root / "models" / "mnist" / "aliases" / "champion.json").is_file() and not (root / "versions").exists()
        wait_until(lambda: httpx.get(running.url + "/v2/models/shapes/ready").status_code == 200, what="new model")
        answer = httpx.post(running.url + "/v2/models/mnist/infer", json=request).json()
        assert answer["model_version"] == "v0002"
        assert np.allclose(answer["outputs"][0]["data"], digits.logits[0], atol=1e-4)
        Registry(root, "mnist").promote("v0001")  # hot reload follows the migrated alias
        wait_until(lambda: httpx.post(running.url + "/v2/models/mnist/infer", json=request).json()["model_version"]
                   == "v0001", what="promotion served")
        answer = httpx.post(running.url + "/v2/models/mnist/infer", json=request).json()
        assert np.allclose(answer["outputs"][0]["data"], other_model.logits[0], atol=1e-4)  # v0001's weights
