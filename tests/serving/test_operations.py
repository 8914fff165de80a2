"""Operations: bearer auth, body size limit (413), concurrency limit (429), graceful drain, /metrics, logs."""

from __future__ import annotations

import json
import logging
import socket
import threading

import httpx
import numpy as np
import pytest

from tuneline.serving.client import InferenceClient, ServerError
from tuneline.serving.logs import JsonFormatter
from tests.serving.conftest import run_server, wait_until
from tests.serving.registry_helper import make_registry

INFER = "/v2/models/mnist/infer"


@pytest.fixture(scope="module")
def one_version(tmp_path_factory, onnx_model):
    return make_registry(tmp_path_factory.mktemp("ops"), onnx_model)


def _uint8_request(image: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                                   "data": image.ravel().tolist()}]}).encode()


def _start_slow_upload(port: int, body: bytes, path: str = INFER) -> socket.socket:
    """A request whose headers and first half of the body are sent; the rest is up to the caller."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    return sock


def _finish(sock: socket.socket, body: bytes) -> tuple[int, bytes]:
    sock.sendall(body[len(body) // 2:])
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    sock.close()
    return int(head.split()[1]), rest


def test_bearer_token_guards_everything_but_health(one_version, digits):
    with run_server(one_version, token="s3cret") as running:
        url = running.url
        assert httpx.get(url + "/v2/health/live").status_code == 200
        assert httpx.get(url + "/v2/health/ready").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            refused = httpx.get(url + "/v2/models/mnist", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in refused.json()["error"]
        assert httpx.post(url + INFER, content=_uint8_request(digits.images[0])).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        with InferenceClient(url, token="s3cret") as client:
            assert client.infer(digits.images[:2]).outputs["class"].tolist() == digits.classes[:2].tolist()
        with InferenceClient(url, model="mnist") as anonymous, pytest.raises(ServerError) as err:
            anonymous.model_metadata()
        assert err.value.status == 401


def test_oversized_bodies_are_413(one_version, digits):
    with run_server(one_version, max_body_bytes=4096) as running:
        big = json.dumps({"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "FP32",
                                      "data": digits.images[:2].astype(float).ravel().tolist()}]}).encode()
        assert len(big) > 4096
        response = httpx.post(running.url + INFER, content=big)
        assert response.status_code == 413 and "exceeds serve.max_body_bytes (4096)" in response.json()["error"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for start in range(0, len(big), 1000):
                yield big[start:start + 1000]

        chunked = httpx.post(running.url + INFER, content=chunks())
        assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["error"]
        small = httpx.post(running.url + INFER, content=_uint8_request(digits.images[0]))
        assert small.status_code == 200  # under the limit still served
        assert running.metric('tuneline_http_rejected_total{reason="413"}') == 1


def test_concurrency_limit_answers_429_and_in_flight_requests_still_finish(one_version, digits):
    body = _uint8_request(digits.images[0])
    with run_server(one_version, max_concurrency=2) as running:
        slow = [_start_slow_upload(running.port, body) for _ in range(2)]
        wait_until(lambda: running.app.state.holder.in_flight() == 2, what="two requests in flight")
        busy = httpx.post(running.url + INFER, content=body)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert "server busy: 2 inference requests in flight" in busy.json()["error"]
        assert httpx.get(running.url + "/v2/health/ready").status_code == 200  # probes are not limited
        for sock in slow:
            status, answer = _finish(sock, body)
            assert status == 200 and json.loads(answer)["outputs"][2]["data"] == [int(digits.classes[0])]
        assert httpx.post(running.url + INFER, content=body).status_code == 200


def test_graceful_shutdown_drains_in_flight_requests(one_version, digits):
    body = _uint8_request(digits.images[1])
    with run_server(one_version) as running:
        sock = _start_slow_upload(running.port, body)
        wait_until(lambda: running.app.state.holder.in_flight() == 1, what="request in flight")
        running.server.should_exit = True  # what SIGTERM does
        wait_until(lambda: not _accepts(running.port), what="listener closed")
        status, answer = _finish(sock, body)  # the request that was in flight completes
        assert status == 200 and json.loads(answer)["outputs"][2]["data"] == [int(digits.classes[1])]
        running.thread.join(timeout=15)
        assert not running.thread.is_alive()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_metrics_cover_requests_batches_queue_model_and_provider(server, digits):
    with InferenceClient(server.url) as client:
        client.infer(digits.images[:3])
    httpx.post(server.url + INFER, content=b"nope")
    text = httpx.get(server.url + "/metrics").text
    for expected in [
        'tuneline_http_requests_total{endpoint="/v2/models/{name}/infer",method="POST",status="200"}',
        'tuneline_http_requests_total{endpoint="/v2/models/{name}/infer",method="POST",status="400"}',
        'tuneline_http_request_duration_seconds_bucket{endpoint="/v2/models/{name}/infer",le="0.01",method="POST",status="200"}',
        'tuneline_batch_size_rows_bucket{le="4.0",model="mnist",version="v0002"}',
        'tuneline_batch_queue_seconds_count{model="mnist",version="v0002"}',
        'tuneline_session_run_seconds_count{model="mnist",provider="CPUExecutionProvider",version="v0002"}',
        'tuneline_model_info{name="mnist",provider="CPUExecutionProvider",role="champion",version="v0002"} 1.0',
        'tuneline_model_loads_total{result="success"}',
        "tuneline_ready 1.0",
        "tuneline_inference_requests_in_flight 0.0",
    ]:
        assert expected in text, expected
    assert server.metric('tuneline_batch_size_rows_sum{model="mnist",version="v0002"}') >= 3


def test_access_log_and_model_events_are_structured(one_version, digits, caplog):
    caplog.set_level(logging.INFO)
    with run_server(one_version, access_log=True) as running:
        httpx.post(running.url + INFER, content=_uint8_request(digits.images[0]), headers={"x-request-id": "abc"})
    records = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name.startswith("tuneline.serving")]
    loaded = next(r for r in records if r.get("event") == "model_loaded")
    assert loaded["version"] == "v0001" and loaded["provider"] == "CPUExecutionProvider" and loaded["load_ms"] > 0
    request = next(r for r in records if r.get("event") == "request" and r["path"] == INFER)
    assert request["status"] == 200 and request["method"] == "POST" and request["ms"] > 0 and request["level"] == "info"
    assert {"ts", "logger", "msg"} <= set(request)
    assert any(r.get("event") == "stopped" for r in records)


def test_batching_off_still_answers_each_request(one_version, digits):
    with run_server(one_version, batching=False) as running, InferenceClient(running.url) as client:
        result = client.infer(digits.images[:5])
        assert result.outputs["class"].tolist() == digits.classes[:5].tolist()
        assert running.metric('tuneline_batch_size_rows_count{model="mnist",version="v0001"}') >= 1


def ready_before_warm_up(monkeypatch) -> None:
    """Mutant: a readiness probe that answers 200 as soon as a model name is known, before its load and warm-up."""
    from tuneline.serving.model_holder import ModelHolder

    monkeypatch.setattr(ModelHolder, "ready", property(lambda self: bool(self.slots)))


MUTANT = pytest.mark.xfail(strict=True, raises=AssertionError, reason="the mutant must fail this test")


@pytest.mark.parametrize("mutant", [None, pytest.param(ready_before_warm_up, marks=MUTANT, id="ready-before-warm")])
def test_readiness_waits_for_warm_up(one_version, digits, mutant, monkeypatch):
    """Live at once; ready only once the champion is loaded and warmed: the warm-up's first session run is held
    (a real run, started only when the test releases it) and the server must answer 503 until it has finished."""
    from tuneline.serving.model_holder import LoadedModel

    if mutant:
        mutant(monkeypatch)
    warming, release = threading.Event(), threading.Event()
    run = LoadedModel.run

    def held_run(self, pixels):
        if not release.is_set():  # the warm-up (no request can reach a model before it is the champion)
            warming.set()
            release.wait(20)
        return run(self, pixels)

    monkeypatch.setattr(LoadedModel, "run", held_run)
    with run_server(one_version, wait_ready=False) as running:
        try:
            assert warming.wait(20), "the warm-up never ran"
            assert httpx.get(running.url + "/v2/health/live").status_code == 200
            for path in ("/v2/health/ready", "/v2/models/mnist/ready"):
                held = httpx.get(running.url + path)
                assert held.status_code == 503, f"{path} answered {held.status_code} during the warm-up"
            infer = httpx.post(running.url + INFER, content=_uint8_request(digits.images[0]))
            assert infer.status_code == 503 and "not ready" in infer.json()["error"]
            assert running.metric("tuneline_ready") == 0
        finally:
            release.set()
        wait_until(lambda: httpx.get(running.url + "/v2/health/ready").status_code == 200, what="ready")
        assert httpx.get(running.url + "/v2/models/mnist/ready").status_code == 200
        answer = httpx.post(running.url + INFER, content=_uint8_request(digits.images[0]))
        assert answer.status_code == 200 and answer.json()["outputs"][2]["data"] == [int(digits.classes[0])]
        assert running.metric("tuneline_ready") == 1
