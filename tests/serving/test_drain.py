"""Lossless drain (issue 16, defect 3): on SIGTERM every request the server has read is answered, 200 or JSON 503.

`server.should_exit = True` is what uvicorn's SIGTERM handler does. Each test puts a request in a known place
(held in the batcher, half uploaded, about to arrive on an idle keep-alive connection) before the signal.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.serving.conftest import run_server, wait_until
from tests.serving.registry_helper import make_registry
from tests.serving.test_operations import _accepts, _finish, _start_slow_upload, _uint8_request

INFER = "/v2/models/mnist/infer"


@pytest.fixture(scope="module")
def one_version(tmp_path_factory, onnx_model):
    return make_registry(tmp_path_factory.mktemp("drain"), onnx_model)


def _request(body: bytes) -> bytes:
    return (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from `sock` (status, lower-cased headers, body); a reset or EOF fails the test."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer (got {data!r})"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def _class(answer: bytes) -> int:
    return json.loads(answer)["outputs"][2]["data"][0]


def _grpc_live(port: int) -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            return client.is_server_live(client_timeout=1.0)
    except InferenceServerException:
        return False


def test_request_held_in_the_batcher_at_sigterm_is_answered_and_grpc_stops_taking_rpcs(one_version, digits):
    # A 5 s batch window, and a second request in flight (A, half uploaded): B provably waits in the batcher.
    with run_server(one_version, max_queue_delay_us=5_000_000, grpc_port=0) as running:
        grpc_port = running.app.state.grpc_port
        assert _grpc_live(grpc_port)
        body_a, body_b = _uint8_request(digits.images[1]), _uint8_request(digits.images[2])
        a = _start_slow_upload(running.port, body_a)
        wait_until(lambda: running.holder.in_flight() == 1, what="A in flight")
        b = socket.create_connection(("127.0.0.1", running.port))
        b.sendall(_request(body_b))
        batcher = running.holder.get("mnist").batcher
        wait_until(lambda: batcher.queued == 1 and running.holder.in_flight() == 2, what="B held in the batcher")
        signalled = time.monotonic()
        running.server.should_exit = True  # SIGTERM
        status, headers, answer = _read_response(b)
        assert status == 200 and _class(answer) == digits.classes[2]
        assert time.monotonic() - signalled < 2.0  # dispatched at once, not after the 5 s window
        assert headers["connection"] == "close"
        # gRPC stops taking new RPCs as soon as the drain starts, while REST is still draining A.
        wait_until(lambda: not _grpc_live(grpc_port), timeout=3, what="gRPC refusing new RPCs")
        assert running.holder.in_flight() == 1 and running.thread.is_alive()
        status, answer = _finish(a, body_a)  # A's body arrives after the signal: still served
        assert status == 200 and _class(answer) == digits.classes[1]
        running.thread.join(timeout=15)
        assert not running.thread.is_alive()


def test_short_drain_answers_what_is_left_with_a_json_503(one_version, digits):
    with run_server(one_version, shutdown_timeout_s=0.5) as running:
        body = _uint8_request(digits.images[0])
        stuck = _start_slow_upload(running.port, body)  # its body never completes
        wait_until(lambda: running.holder.in_flight() == 1, what="request in flight")
        signalled = time.monotonic()
        running.server.should_exit = True
        status, headers, answer = _read_response(stuck)  # not a text/plain 500, not a reset
        assert status == 503 and headers["content-type"] == "application/json", (status, answer)
        assert "drain time (serve.shutdown_timeout_s = 0.5 s) ran out" in json.loads(answer)["error"]
        assert headers["connection"] == "close"
        assert time.monotonic() - signalled < 3
        running.thread.join(timeout=15)
        assert not running.thread.is_alive()


def test_request_arriving_on_an_idle_keep_alive_connection_during_the_drain_is_answered(one_version, digits):
    with run_server(one_version) as running:
        conn = socket.create_connection(("127.0.0.1", running.port))
        conn.sendall(_request(_uint8_request(digits.images[3])))
        status, headers, _ = _read_response(conn)
        assert status == 200 and headers.get("connection") != "close"  # kept alive, now idle
        running.server.should_exit = True
        wait_until(lambda: not _accepts(running.port), timeout=5, what="listener closed")
        # The listener is closed, but a request already on its way on a kept-alive connection is served
        # (uvicorn alone closes idle connections with the listener: the client would see a reset).
        conn.sendall(_request(_uint8_request(digits.images[4])))
        status, headers, answer = _read_response(conn)
        assert status == 200 and _class(answer) == digits.classes[4]
        assert headers["connection"] == "close"
        assert conn.recv(1) == b""  # then the server closes it
        running.thread.join(timeout=15)
        assert not running.thread.is_alive()
