"""Every Open Inference Protocol endpoint and every error code, on a real server with a real exported model."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tuneline.serving.client import InferenceClient, ServerError, parse_infer_response

INFER = "/v2/models/mnist/infer"


def post_binary(url: str, header: dict, data: bytes, **kwargs) -> httpx.Response:
    head = json.dumps(header).encode()
    return httpx.post(url, content=head + data, headers={"inference-header-content-length": str(len(head)),
                                                         "content-type": "application/octet-stream"}, **kwargs)


def pixels_input(images: np.ndarray, datatype: str = "FP32", flat: bool = False) -> dict:
    shape = [len(images), 784] if flat else [len(images), 1, 28, 28]
    return {"name": "pixels", "shape": shape, "datatype": datatype, "data": images.ravel().tolist()}


def test_health_and_server_metadata(server):
    live = httpx.get(server.url + "/v2/health/live")
    assert live.status_code == 200 and live.content == b""
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "tuneline" and {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_comes_from_the_onnx_file_and_card(server, onnx_model):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}
    meta = httpx.get(server.url + "/v2/models/mnist").json()
    assert meta["name"] == "mnist" and meta["versions"] == ["v0002"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "class"]
    assert meta["labels"] == json.loads(props["labels"])
    assert meta["parameters"]["provider"] == "CPUExecutionProvider" and meta["parameters"]["version"] == "v0002"
    assert meta["parameters"]["git_commit"] == props["git_commit"] and meta["card"]["version"] == "v0002"
    assert meta["normalization"]["applied_in_graph"] is True
    assert httpx.get(server.url + "/v2/models/mnist/versions/v0002").json()["parameters"]["version"] == "v0002"


def test_model_ready_per_version(server):
    def get(path: str) -> httpx.Response:
        return httpx.get(server.url + path)

    assert get("/v2/models/mnist/ready").status_code == 200
    assert get("/v2/models/mnist/versions/v0002/ready").status_code == 200
    not_loaded = get("/v2/models/mnist/versions/v0001/ready")
    assert not_loaded.status_code == 503 and "not loaded" in not_loaded.json()["error"]
    assert get("/v2/models/mnist/versions/v0099/ready").status_code == 404
    assert get("/v2/models/other/ready").status_code == 404


def test_json_inference_matches_onnxruntime_for_fp32_and_uint8(server, digits):
    images = digits.images[:5]
    for datatype, flat in (("FP32", False), ("UINT8", True)):
        body = {"id": f"req-{datatype}", "inputs": [pixels_input(images, datatype, flat)]}
        response = httpx.post(server.url + INFER, json=body)
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["id"] == f"req-{datatype}" and doc["model_name"] == "mnist" and doc["model_version"] == "v0002"
        out = {o["name"]: o for o in doc["outputs"]}
        assert set(out) == {"logits", "probabilities", "class"}
        assert out["logits"]["shape"] == [5, 10] and out["class"]["datatype"] == "INT64"
        logits = np.asarray(out["logits"]["data"], dtype=np.float32).reshape(5, 10)
        np.testing.assert_allclose(logits, digits.logits[:5], atol=1e-4)
        assert out["class"]["data"] == digits.classes[:5].tolist()
        np.testing.assert_allclose(np.asarray(out["probabilities"]["data"]).reshape(5, 10).sum(1), 1.0, atol=1e-5)
    assert (digits.classes == digits.labels).mean() > 0.8  # a real model on real digits


def test_requested_outputs_only(server, digits):
    body = {"inputs": [pixels_input(digits.images[:2])], "outputs": [{"name": "class"}]}
    doc = httpx.post(server.url + INFER, json=body).json()
    assert [o["name"] for o in doc["outputs"]] == ["class"] and "id" not in doc


def test_binary_round_trip(server, digits):
    images = digits.images[:3]
    header = {"id": "bin", "inputs": [{"name": "pixels", "shape": [3, 1, 28, 28], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": images.nbytes}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "class"}]}
    response = post_binary(server.url + INFER, header, images.tobytes())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    json_length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:json_length])
    logits_out, class_out = head["outputs"]
    assert logits_out["parameters"] == {"binary_data_size": 3 * 10 * 4} and "data" not in logits_out
    assert class_out["data"] == digits.classes[:3].tolist()  # JSON output beside a binary one
    logits = np.frombuffer(response.content[json_length:], dtype="<f4").reshape(3, 10)
    np.testing.assert_allclose(logits, digits.logits[:3], atol=1e-4)
    assert len(response.content) == json_length + 120

    # FP32 binary input, every output binary via binary_data_output, decoded by the client's parser
    floats = images.astype("<f4")
    header = {"parameters": {"binary_data_output": True},
              "inputs": [{"name": "pixels", "shape": [3, 784], "datatype": "FP32",
                          "parameters": {"binary_data_size": floats.nbytes}}]}
    response = post_binary(server.url + INFER, header, floats.tobytes())
    result = parse_infer_response(response.content, response.headers["inference-header-content-length"])
    assert result.outputs["class"].tolist() == digits.classes[:3].tolist()
    np.testing.assert_allclose(result.outputs["probabilities"].sum(1), 1.0, atol=1e-5)


def test_client_json_and_binary_agree(server, digits):
    with InferenceClient(server.url) as client:
        assert client.live() and client.ready() and client.model == "mnist"
        binary = client.infer(digits.images[:4], outputs=("logits", "class"), request_id="x")
        as_json = client.infer(digits.images[:4].astype(np.float32), binary=False, outputs=("logits", "class"))
        assert binary.id == "x" and binary.model_version == "v0002"
        np.testing.assert_allclose(binary.outputs["logits"], as_json.outputs["logits"], atol=1e-5)
        np.testing.assert_allclose(binary.outputs["logits"], digits.logits[:4], atol=1e-4)
        assert binary.outputs["class"].dtype == np.int64
        with pytest.raises(ServerError) as err:
            client.infer(digits.images[:1], version="v0099")
        assert err.value.status == 404


NAN = np.full((1, 784), np.nan, dtype="<f4")


@pytest.mark.parametrize("kind, body, match", [
    ("raw", b"{not json", "not valid JSON"),
    ("json", [1, 2], "must be a JSON object"),
    ("json", {"inputs": []}, "inputs must be a list holding the one input 'pixels'"),
    ("json", {"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP32", "data": [0] * 784}]},
     "unknown input 'image': model 'mnist' takes 'pixels'"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "INT32", "data": [0] * 784}]},
     "datatype 'INT32' is not accepted: use FP32 or UINT8"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32", "data": [0] * 784}]},
     r"shape \[1, 28, 28\] is not accepted: expected \[N, 1, 28, 28\] or \[N, 784\]"),
    ("json", {"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "FP32", "data": [0] * 784}]},
     r"shape \[2, 784\] has 1568 elements but data has 784"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": ["a"] * 784}]},
     "data is not a regular array of numbers"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [300] * 784}]},
     "UINT8 data must be integers 0..255"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [-1.0] * 784}]},
     r"values span \[-1, -1\] but the model takes raw pixels in \[0, 255\]"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [None] * 784}]},
     "contains NaN or infinite values"),  # JSON has no NaN literal; null reads as NaN
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [[0] * 780, [0] * 4]}]},
     "data is not a regular array of numbers"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [0.5] * 784}]},
     "UINT8 data must be integers 0..255"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0] * 784}],
              "outputs": [{"name": "embedding"}]},
     "unknown output 'embedding': the model has logits, probabilities, class"),
    ("json", {"id": 7, "inputs": []}, "id must be a string"),
    ("json", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32"}]},
     'has neither "data" nor parameters.binary_data_size'),
    ("binary", ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32",
                             "parameters": {"binary_data_size": 3136}}]}, NAN.tobytes()), "contains NaN"),
    ("binary", ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                             "parameters": {"binary_data_size": 700}}]}, bytes(700)),
     r"binary data is 700 bytes but shape \[1, 784\] of UINT8 needs 784"),
    ("binary", ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                             "parameters": {"binary_data_size": 784}}]}, bytes(790)),
     "binary_data_size 784 but 790 bytes follow the JSON"),
    ("binary", ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]}, bytes(4)),
     "4 bytes follow the JSON but no input has parameters.binary_data_size"),
])
def test_bad_requests_are_400_with_a_clear_message(server, kind, body, match):
    if kind == "raw":
        response = httpx.post(server.url + INFER, content=body)
    elif kind == "json":
        response = httpx.post(server.url + INFER, json=body)
    else:
        response = post_binary(server.url + INFER, *body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert __import__("re").search(match, response.json()["error"]), response.json()["error"]


def test_header_length_beyond_the_body_and_compressed_bodies_are_400(server):
    response = httpx.post(server.url + INFER, content=b"{}", headers={"inference-header-content-length": "99"})
    assert response.status_code == 400 and "outside the body" in response.json()["error"]
    response = httpx.post(server.url + INFER, content=b"\x1f\x8b", headers={"content-encoding": "gzip"})
    assert response.status_code == 400 and "Content-Encoding 'gzip' is not supported" in response.json()["error"]


def test_unknown_model_version_route_and_method(server, digits):
    body = {"inputs": [pixels_input(digits.images[:1])]}
    unknown_model = httpx.post(server.url + "/v2/models/cifar/infer", json=body)
    assert unknown_model.status_code == 404 and "unknown model 'cifar'" in unknown_model.json()["error"]
    unknown_version = httpx.post(server.url + "/v2/models/mnist/versions/v0042/infer", json=body)
    assert unknown_version.status_code == 404 and "v0042" in unknown_version.json()["error"]
    traversal = httpx.get(server.url + "/v2/models/mnist/versions/..%2F..%2Fetc")
    assert traversal.status_code == 404
    not_loaded = httpx.post(server.url + "/v2/models/mnist/versions/v0001/infer", json=body)
    assert not_loaded.status_code == 503 and "POST /v2/repository/models/mnist/load" in not_loaded.json()["error"]
    assert httpx.get(server.url + "/v2/nothing").json() == {"error": "Not Found"}
    wrong_method = httpx.get(server.url + INFER)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_openapi_schema_is_served(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer", "/v2/health/ready",
            "/v2/repository/models/{name}/load", "/classify"} <= set(schema["paths"])
    body = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(body)
    assert {"InferenceRequest", "RequestInput", "InferenceResponse", "Error"} <= set(schema["components"]["schemas"])


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_classify_png_and_jpeg_uploads(server, digits):
    with InferenceClient(server.url) as client:
        for i in range(3):  # PNG is lossless: exactly the model's answer for these pixels
            result = client.classify(_png(digits.images[i]))
            assert result["class"] == digits.classes[i] and result["label"] == str(digits.classes[i])
            assert result["model_version"] == "v0002" and abs(sum(result["probabilities"].values()) - 1) < 1e-4
        inverted = client.classify(_png(255 - digits.images[0]))  # dark ink on white paper
        assert inverted["class"] == digits.classes[0]
        confident = int(np.argmax(digits.logits.max(1) - np.sort(digits.logits, 1)[:, -2]))
        assert client.classify(_png(digits.images[confident], "JPEG"))["class"] == digits.classes[confident]
    raw = httpx.post(server.url + "/classify", content=_png(digits.images[1]), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["class"] == digits.classes[1]
    garbage = httpx.post(server.url + "/classify", files={"file": ("x.png", b"not an image")})
    assert garbage.status_code == 400 and "not a readable PNG or JPEG" in garbage.json()["error"]
    no_file = httpx.post(server.url + "/classify", files={"other": ("x.png", b"")})
    assert no_file.status_code == 400 and "no file field 'file'" in no_file.json()["error"]
    gif = io.BytesIO()
    Image.fromarray(digits.images[0]).save(gif, format="GIF")
    assert httpx.post(server.url + "/classify", files={"file": ("x.gif", gif.getvalue())}).status_code == 400


def test_repository_index(server):
    index = httpx.post(server.url + "/v2/repository/index").json()
    assert index == [{"name": "mnist", "version": "v0001", "state": "UNAVAILABLE", "reason": "not loaded"},
                     {"name": "mnist", "version": "v0002", "state": "READY", "reason": "champion"}]
