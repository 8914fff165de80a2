"""The Open Inference Protocol over gRPC, spoken by a stock client (tritonclient.grpc) to a real server that also
serves REST: readiness, metadata, inference on real MNIST test digits and on an RGB model (checked against ONNX
Runtime run directly on the files), typed and raw tensors, and bad input answered with the right status code."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import tritonclient.grpc as grpcclient  # the `test` extra: a missing client fails, it never skips
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tuneline.tasks.ship.registry import Registry
from tests.serving.conftest import run_server, wait_until
from tests.tasks.ship.synthetic_models import synthetic_images, train_and_export, write_prepared

CLASSES = ["cat", "dog", "ship", "frog"]


def _register(root: Path, name: str, model: Path) -> str:
    registry = Registry(root, name)
    version = registry.register({"model.onnx": model}, metrics={"accuracy": 1.0}, gates=[], lineage={}, run_id=None)
    registry.promote(version)
    return version


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory) -> Path:
    """seed_cnn on a synthetic 3x12x12 RGB data set of 4 named classes, exported as model 'shapes' (~3 s)."""
    base = tmp_path_factory.mktemp("grpc-rgb")
    prepared = write_prepared(base / "prepared", 3, 12, CLASSES)
    return train_and_export(prepared, base / "model", "shapes", epochs=1).onnx_path


@pytest.fixture(scope="module")
def served(tmp_path_factory, onnx_model: Path, rgb_model: Path):
    """One server, REST and gRPC (serve.grpc_port 0: any free port), serving 'mnist' and the RGB 'shapes'."""
    root = tmp_path_factory.mktemp("grpc-registry") / "registry"
    _register(root, "mnist", onnx_model)
    _register(root, "shapes", rgb_model)
    with run_server(root, grpc_port=0) as running:
        wait_until(lambda: all(httpx.get(f"{running.url}/v2/models/{n}/ready").status_code == 200
                               for n in ("mnist", "shapes")), what="both models ready")
        running.grpc_url = f"127.0.0.1:{running.app.state.grpc_port}"
        yield running


@pytest.fixture(scope="module")
def client(served):
    with grpcclient.InferenceServerClient(served.grpc_url) as triton:
        yield triton


def _input(images: np.ndarray, datatype: str = "FP32", flat: bool = False) -> grpcclient.InferInput:
    array = images.reshape(len(images), -1) if flat else images
    array = array.astype(np.float32 if datatype == "FP32" else np.uint8)
    tensor = grpcclient.InferInput("pixels", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_readiness_and_metadata_from_a_stock_client(client, served):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist") and client.is_model_ready("shapes")
    assert client.is_model_ready("mnist", "v0001")
    assert not client.is_model_ready("nope") and not client.is_model_ready("mnist", "v0042")  # a probe: false
    server = client.get_server_metadata()
    assert server.name == "tuneline" and "binary_tensor_data" in server.extensions
    meta = client.get_model_metadata("mnist", as_json=True)
    assert meta["name"] == "mnist" and meta["versions"] == ["v0001"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", ["-1", "10"]), ("probabilities", "FP32", ["-1", "10"]), ("class", "INT64", ["-1"])]
    rgb = client.get_model_metadata("shapes")
    assert list(rgb.inputs[0].shape) == [-1, 3, 12, 12] and list(rgb.outputs[0].shape) == [-1, 4]
    rest = httpx.get(served.url + "/v2/models/mnist").json()  # the same facts as REST
    assert rest["inputs"][0]["shape"] == [int(d) for d in meta["inputs"][0]["shape"]]


def test_raw_inference_on_real_mnist_digits_matches_onnxruntime(client, digits):
    for datatype, flat in (("FP32", False), ("UINT8", True)):
        images = digits.images[:, None]  # [N, 1, 28, 28]: the declared shape (flat: [N, 784])
        result = client.infer("mnist", [_input(images, datatype, flat)], request_id=f"r-{datatype}")
        response = result.get_response()
        assert response.id == f"r-{datatype}" and response.model_name == "mnist" and response.model_version == "v0001"
        assert len(response.raw_output_contents) == 3  # raw tensors out, as Triton answers
        logits = result.as_numpy("logits")
        assert logits.shape == (len(digits.images), 10) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, digits.logits, atol=1e-4)
        assert result.as_numpy("class").tolist() == digits.classes.tolist()
        np.testing.assert_allclose(result.as_numpy("probabilities").sum(1), 1.0, atol=1e-5)
    assert (digits.classes == digits.labels).mean() > 0.8  # a real model on real digits
    only_class = client.infer("mnist", [_input(digits.images[:2, None])], outputs=[grpcclient.InferRequestedOutput("class")])
    assert [o.name for o in only_class.get_response().outputs] == ["class"]


def test_typed_tensor_contents(served, digits):
    """contents.fp32_contents / uint_contents instead of raw bytes, through the stock client's own stub."""
    import grpc

    images = digits.images[:3]
    with grpc.insecure_channel(served.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for datatype, field, values in (("FP32", "fp32_contents", images.astype(np.float32).ravel().tolist()),
                                        ("UINT8", "uint_contents", images.ravel().tolist())):
            request = service_pb2.ModelInferRequest(model_name="mnist")
            request.inputs.add(name="pixels", datatype=datatype, shape=[3, 784])
            getattr(request.inputs[0].contents, field).extend(values)
            response = stub.ModelInfer(request)
            logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 10)
            np.testing.assert_allclose(logits, digits.logits[:3], atol=1e-4)


def test_an_rgb_model_over_grpc(client, rgb_model):
    import onnxruntime as ort

    images = synthetic_images(np.arange(4), 3, 12, np.random.default_rng(3))  # uint8 [4, 3, 12, 12]
    session = ort.InferenceSession(str(rgb_model), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["logits"], {"pixels": images.astype(np.float32)})
    for datatype in ("UINT8", "FP32"):
        result = client.infer("shapes", [_input(images, datatype)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
        assert result.as_numpy("class").tolist() == expected.argmax(1).tolist()


def _raw(shape: list[int], datatype: str, data: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("pixels", shape, datatype)
    tensor._raw_content = data  # the stock client's own field: lets a test send bytes that do not fit the shape
    return tensor


OK_PIXELS = np.zeros((1, 784), dtype=np.uint8)

BAD = [  # (case, model, inputs builder, expected status, message fragment)
    ("wrong shape", "mnist", lambda: [_input(np.zeros((1, 28, 28)))], "INVALID_ARGUMENT", "is not accepted"),
    ("wrong datatype", "mnist", lambda: [_raw([1, 784], "INT32", bytes(3136))], "INVALID_ARGUMENT",
     "datatype 'INT32' is not accepted"),
    ("wrong input name", "mnist", lambda: [grpcclient.InferInput("image", [1, 784], "FP32")], "INVALID_ARGUMENT",
     "unknown input 'image'"),
    ("bytes short of the shape", "mnist", lambda: [_raw([2, 784], "UINT8", bytes(784))], "INVALID_ARGUMENT",
     "needs 1568"),
    ("int64-overflowing shape", "mnist", lambda: [_raw([2**62, 784], "UINT8", bytes(784))], "INVALID_ARGUMENT",
     "elements"),
    ("NaN", "mnist", lambda: [_raw([1, 784], "FP32", np.full(784, np.nan, "<f4").tobytes())], "INVALID_ARGUMENT",
     "NaN"),
    ("normalised pixels", "mnist", lambda: [_input(-np.ones((1, 784)))], "INVALID_ARGUMENT", "do not normalise"),
    ("no data", "mnist", lambda: [grpcclient.InferInput("pixels", [1, 784], "FP32")], "INVALID_ARGUMENT",
     "contents.fp32_contents has 0"),
    ("unknown model", "cifar", lambda: [_input(OK_PIXELS)], "NOT_FOUND", "unknown model 'cifar'"),
    ("empty model name", "", lambda: [_input(OK_PIXELS)], "INVALID_ARGUMENT", "model name is empty"),
]


@pytest.mark.parametrize("case, model, inputs, status, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_the_right_grpc_status(client, case, model, inputs, status, fragment):
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs())
    assert err.value.status() == f"StatusCode.{status}", (case, err.value.status(), err.value.message())
    assert fragment in err.value.message(), err.value.message()


def test_unknown_version_and_output_and_typed_range(client, served):
    import grpc

    with pytest.raises(InferenceServerException) as err:
        client.infer("mnist", [_input(OK_PIXELS)], model_version="v0042")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "v0042" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("mnist", [_input(OK_PIXELS)], outputs=[grpcclient.InferRequestedOutput("embedding")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "unknown output 'embedding'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("cifar")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with grpc.insecure_channel(served.grpc_url) as channel:
        request = service_pb2.ModelInferRequest(model_name="mnist")
        request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 784]).contents.uint_contents.extend([300] * 784)
        with pytest.raises(grpc.RpcError) as rpc:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0..255" in rpc.value.details()
    # A message over serve.max_body_bytes is refused by gRPC itself, before any of it is parsed.
    too_big = np.zeros((served.app.state.settings.max_body_bytes // 784 + 1, 784), dtype=np.uint8)
    with pytest.raises(InferenceServerException) as err:
        client.infer("mnist", [_input(too_big, "UINT8")])
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_grpc_and_rest_requests_share_the_batcher(client, served, digits):
    """Concurrent gRPC and REST requests all come back right, and every row went through the one batcher."""
    rows_before = served.metric("tuneline_batch_size_rows_sum")

    def over_grpc(i: int) -> int:
        return int(client.infer("mnist", [_input(digits.images[i:i + 1, None])]).as_numpy("class")[0])

    def over_rest(i: int) -> int:
        body = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                            "data": digits.images[i].ravel().tolist()}], "outputs": [{"name": "class"}]}
        return httpx.post(served.url + "/v2/models/mnist/infer", json=body).json()["outputs"][0]["data"][0]

    with ThreadPoolExecutor(16) as pool:  # interleaved: each gRPC request beside a REST one
        futures = [(pool.submit(over_grpc, i), pool.submit(over_rest, i)) for i in range(24)]
        answers = [(g.result(), r.result()) for g, r in futures]
    assert answers == [(c, c) for c in digits.classes[:24].tolist()]
    assert served.metric("tuneline_batch_size_rows_sum") - rows_before == 48
    grpc_ok = 'tuneline_http_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer",method="GRPC",status="OK"}'
    assert served.metric(grpc_ok) >= 24


def test_the_bearer_token_guards_grpc_as_it_guards_rest(tmp_path, onnx_model):
    root = tmp_path / "registry"
    _register(root, "mnist", onnx_model)
    with run_server(root, grpc_port=0, token="s3cret") as running, \
            grpcclient.InferenceServerClient(f"127.0.0.1:{running.app.state.grpc_port}") as triton:
        assert triton.is_server_live() and triton.is_server_ready()  # probes stay open, as on REST
        with pytest.raises(InferenceServerException) as err:
            triton.infer("mnist", [_input(OK_PIXELS)])
        assert err.value.status() == "StatusCode.UNAUTHENTICATED" and "bearer token" in err.value.message()
        with pytest.raises(InferenceServerException):
            triton.get_model_metadata("mnist", headers={"authorization": "Bearer wrong"})
        answer = triton.infer("mnist", [_input(OK_PIXELS)], headers={"authorization": "Bearer s3cret"})
        assert answer.as_numpy("class").shape == (1,)


@pytest.mark.fast
def test_a_taken_grpc_port_fails_start_up_with_a_clear_error(tmp_path):
    from tuneline.serving.dataplane import DataPlane
    from tuneline.serving.grpc_v2 import start_grpc
    from tuneline.serving.settings import ServeSettings

    cpu = ["CPUExecutionProvider"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServeSettings(registry=tmp_path, grpc_port=taken.getsockname()[1])
        with pytest.raises(OSError, match=r"serve.grpc_port: cannot listen on 127.0.0.1:\d+"):
            asyncio.run(start_grpc(DataPlane(settings, cpu)))
    assert asyncio.run(start_grpc(DataPlane(ServeSettings(registry=tmp_path), cpu))) is None


@pytest.mark.fast
def test_the_descriptor_set_is_the_proto_and_speaks_tritons_wire_format(tmp_path):
    """The committed descriptor set is what protoc makes of the committed .proto, and every field it declares has
    the number and type of Triton's own definition (which tritonclient ships)."""
    from google.protobuf import descriptor_pb2

    from tuneline.serving.proto import DESCRIPTOR_SET, PROTO, messages

    # protoc comes from grpcio-tools (the `test` extra): always compared, never skipped when it is missing.
    assert importlib.util.find_spec("grpc_tools"), "grpc_tools not importable: pip install -e '.[test]' (grpcio-tools)"
    out = tmp_path / "set.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", "--include_imports",
                    f"--descriptor_set_out={out}", str(PROTO)], check=True)
    fresh, committed = (descriptor_pb2.FileDescriptorSet.FromString(p.read_bytes()) for p in (out, DESCRIPTOR_SET))
    assert fresh == committed, "regenerate serving/proto/grpc_predict_v2.binpb (command in the .proto)"
    ours = messages()

    def fields(descriptor) -> dict:
        found = {f.name: (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED)
                 for f in descriptor.fields}
        for nested in descriptor.nested_types:
            if not nested.GetOptions().map_entry:
                found |= {f"{nested.name}.{k}": v for k, v in fields(nested).items()}
        return found

    for name in ("ModelInferRequest", "ModelInferResponse", "ModelMetadataResponse", "InferParameter",
                 "InferTensorContents", "ModelReadyRequest", "ServerMetadataResponse"):
        theirs = fields(getattr(service_pb2, name).DESCRIPTOR)
        mine = fields(getattr(ours, name).DESCRIPTOR)
        assert {k: theirs[k] for k in mine} == mine, name
    triton_methods = {m.name: (m.input_type.name, m.output_type.name)
                      for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert all(triton_methods[m.name] == (m.input_type.name, m.output_type.name) for m in ours.service.methods)
