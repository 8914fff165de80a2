"""Inference requests are answered by the bare ASGI endpoint ahead of FastAPI's stack (app.InferenceServer), and
get exactly what the same requests get through FastAPI: status, body and headers, for answers and for errors."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest

from tests.serving.conftest import run_server

INFER = "/v2/models/mnist/infer"
KEPT_HEADERS = ("content-type", "content-length", "x-tuneline-version", "inference-header-content-length",
                "www-authenticate", "retry-after", "connection")


@pytest.fixture(scope="module")
def mnist_test_images(mnist_mirror) -> np.ndarray:
    """MNIST's first three test images, uint8 [3, 28, 28]."""
    data = gzip.decompress((mnist_mirror / "t10k-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[:3]


def binary_request(image: np.ndarray, outputs_binary: bool = True) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 784}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": outputs_binary}},
                                   {"name": "class"}]}).encode()
    return head + image.tobytes(), {"inference-header-content-length": str(len(head)),
                                    "content-type": "application/octet-stream"}


def json_request(data, datatype: str = "FP32", name: str = "pixels", shape=(1, 1, 28, 28)) -> tuple[bytes, dict]:
    body = {"id": "r1", "inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}
    return json.dumps(body).encode(), {"content-type": "application/json"}


def requests_to_compare(images: np.ndarray) -> list[tuple[str, str, bytes, dict]]:
    pixels = images[0].astype(np.float64).ravel().tolist()
    ok_json, ok_binary = json_request(pixels), binary_request(images[1])
    return [
        ("POST", INFER, *ok_json),
        ("POST", INFER, *ok_binary),
        ("POST", INFER, *binary_request(images[2], outputs_binary=False)),
        ("POST", "/v2/models/mnist/versions/v0002/infer", *ok_json),
        ("POST", "/v2/models/mnist/versions/v0001/infer", *ok_json),  # in the registry, not loaded: 503
        ("POST", "/v2/models/mnist/versions/v0099/infer", *ok_json),  # 404
        ("POST", "/v2/models/nope/infer", *ok_json),  # 404
        ("POST", INFER, b"{not json", {"content-type": "application/json"}),
        ("POST", INFER, *json_request([True] * 784)),
        ("POST", INFER, *json_request(pixels[:-1] + [float("nan")])),  # Python's json writes NaN: not JSON, 400
        ("POST", INFER, *json_request([300.0] * 784)),
        ("POST", INFER, *json_request(pixels, name="image")),
        ("POST", INFER, ok_json[0], {**ok_json[1], "content-encoding": "gzip"}),
        ("POST", INFER, b"x" * 20000, {"content-type": "application/json"}),  # over serve.max_body_bytes
        ("GET", INFER, b"", {}),  # 405 either way: only POST is an inference request
        ("POST", "/v2/models/mnist/infer/extra", *ok_json),  # 404: not an inference route
        ("POST", "/v2/models//infer", *ok_json),  # 404: an empty name
    ]


def answers(url: str, requests: list, token: str | None = None) -> list[tuple]:
    auth = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(timeout=10) as client:
        got = []
        for method, path, body, headers in requests:
            r = client.request(method, url + path, content=body, headers={**headers, **auth})
            got.append((method, path, r.status_code, r.content,
                        {k: r.headers[k] for k in KEPT_HEADERS if k in r.headers}))
        return got


def test_inference_requests_take_the_bare_path_and_get_what_fastapi_would_answer(registry, mnist_test_images):
    requests = requests_to_compare(mnist_test_images[:3])
    with run_server(registry, max_body_bytes=12_000) as server:
        match, bare = server.app.hot_path
        seen = []

        async def counted(scope, receive, send):
            seen.append((scope["method"], scope["path"]))
            await bare(scope, receive, send)

        server.app.hot_path = (match, counted)
        fast = answers(server.url, requests)
        server.app.hot_path = None  # every request through FastAPI's middleware stack and router
        through_fastapi = answers(server.url, requests)
        metrics = httpx.get(server.url + "/metrics").text
    inference = [(m, p) for m, p, *_ in requests if m == "POST" and p.endswith("/infer") and "//" not in p]
    assert seen == inference  # every inference request, and nothing else, took the bare path
    for bare_answer, fastapi_answer in zip(fast, through_fastapi, strict=True):
        assert bare_answer == fastapi_answer
    statuses = [status for _, _, status, _, _ in fast]
    assert statuses == [200, 200, 200, 200, 503, 404, 404, 400, 400, 400, 400, 400, 400, 413, 405, 404, 404]
    # Both paths count under the route template, as FastAPI's routes are labelled.
    assert 'tuneline_http_requests_total{endpoint="/v2/models/{name}/infer",method="POST",status="200"} 6.0' in metrics


def test_the_bare_path_refuses_a_missing_token_as_fastapi_does(registry, mnist_test_images):
    body, headers = json_request(mnist_test_images[0].astype(np.float64).ravel().tolist())
    requests = [("POST", INFER, body, headers)]
    with run_server(registry, token="s3cret") as server:
        fast_refused, fast_ok = answers(server.url, requests), answers(server.url, requests, token="s3cret")
        server.app.hot_path = None
        assert answers(server.url, requests) == fast_refused
        assert answers(server.url, requests, token="s3cret") == fast_ok
    assert fast_refused[0][2] == 401 and fast_refused[0][4]["www-authenticate"] == "Bearer"
    assert fast_ok[0][2] == 200
