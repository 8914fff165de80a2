"""Lossless drain (issue 16, defect 3): on SIGTERM every request the server has read is answered, 200 or JSON 503.
And no connection lost (issue 25): readiness answers 503 at once, and the server keeps serving for
serve.drain_delay_s before it closes the listener, so clients that follow readiness see no reset.

`server.should_exit = True` is what uvicorn's SIGTERM handler does (the in-thread servers, with serve.drain_delay_s=0:
the drain steps themselves). Each such test puts a request in a known place (held in the batcher, half uploaded,
about to arrive on an idle keep-alive connection) before the signal. The delay is tested with `tuneline serve`
processes and real signals.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.serving.conftest import free_port, run_server, wait_until
from tests.serving.registry_helper import make_registry
from tests.serving.test_operations import _accepts, _finish, _start_slow_upload, _uint8_request
from tests.serving.test_workers import ENV, REPO, TUNELINE

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
    with run_server(one_version, max_queue_delay_us=5_000_000, grpc_port=0, drain_delay_s=0) as running:
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
    with run_server(one_version, shutdown_timeout_s=0.5, drain_delay_s=0) as running:
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
    with run_server(one_version, drain_delay_s=0) as running:
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


# ----- drain without resets (issue 25): unready at once, keep serving for serve.drain_delay_s, then drain ---------
DELAY_S = 1.5     # serve.drain_delay_s of these servers: short, to keep the test quick
LB_LAG_S = 1.0    # a client (a load balancer) stops sending this long after it sees readiness answer 503
CLIENTS = 48
STARTS = 5


def _serve(registry, port: int, *overrides: str) -> subprocess.Popen:
    """`tuneline serve` as a user runs it, in its own process: real SIGTERM, uvicorn's own signal handling."""
    flags = [item for override in overrides for item in ("-S", override)]
    return subprocess.Popen([*TUNELINE, "serve", "--registry", str(registry), "--port", str(port), *flags],
                            cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)


def _ready_pids(port: int, pids: set[str]) -> set[str]:
    """`pids` plus the worker that answers readiness 200 on a new connection (X-Tuneline-Worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/v2/health/ready", headers={"Connection": "close"})
        answer = conn.getresponse()
        if answer.status == 200 and answer.getheader("x-tuneline-worker"):
            pids.add(answer.getheader("x-tuneline-worker"))
    except OSError:
        pass
    finally:
        conn.close()
    return pids


def _get(port: int, path: str) -> int | None:
    """GET `path` on a new connection: its status, None when the connection fails (refused, reset)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


class _Traffic:
    """CLIENTS threads, each sending inference requests on a new connection per request; one more polls readiness
    every 20 ms (as a load balancer would) and tells them when it answers 503; they stop LB_LAG_S after that."""

    def __init__(self, port: int, bodies: list[bytes]):
        self.port, self.bodies = port, bodies
        self.signalled: float | None = None
        self.noticed: float | None = None   # when readiness first answered 503
        self.live_then: int | None = None    # liveness at that moment
        self.deadline = float("inf")         # the clients' last moment to send (the test's own limit before that)
        self.statuses: Counter[int] = Counter()
        self.errors: list[tuple[float, str]] = []  # (seconds after the signal, exception) while allowed to send
        self.served_after_notice = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        self.threads.append(threading.Thread(target=self._poll_readiness, daemon=True))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads), "client threads still running"

    def _allowed(self) -> bool:
        now = time.monotonic()
        return now < self.deadline and (self.noticed is None or now < self.noticed + LB_LAG_S)

    def _client(self, index: int) -> None:
        n = index
        while self._allowed():
            body = self.bodies[n % len(self.bodies)]
            n += CLIENTS
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("POST", INFER, body, {"Content-Type": "application/json", "Connection": "close"})
                response = conn.getresponse()
                response.read()
                with self.lock:
                    self.statuses[response.status] += 1
                    if self.noticed is not None and response.status == 200:
                        self.served_after_notice += 1
            except OSError as exc:  # ConnectionResetError (http.client.RemoteDisconnected is one), refused, timeout
                with self.lock:
                    self.errors.append((time.monotonic() - (self.signalled or time.monotonic()), repr(exc)))
                return  # one is enough to fail the test; stop adding noise
            finally:
                conn.close()

    def _poll_readiness(self) -> None:
        while self._allowed():
            status = _get(self.port, "/v2/health/ready")
            if status == 503 and self.signalled is not None:
                self.noticed = time.monotonic()
                self.live_then = _get(self.port, "/v2/health/live")
                return
            time.sleep(0.02)


def test_sigterm_turns_readiness_off_at_once_and_loses_no_connection_of_clients_that_follow_it(tmp_path, onnx_model,
                                                                                             digits):
    # The measurement (48 clients, a new connection per request, SIGTERM mid-load): 33-41 connections reset
    # per shutdown, because readiness said 200 until the listener closed under them. Five starts, five SIGTERMs.
    registry = make_registry(tmp_path, onnx_model)
    bodies = [_uint8_request(image) for image in digits.images[:16]]
    for start in range(STARTS):
        port = free_port()
        server = _serve(registry, port, f"serve.drain_delay_s={DELAY_S}", "serve.access_log=false")
        try:
            wait_until(lambda: server.poll() is None and _get(port, "/v2/health/ready") == 200, timeout=60,
                       what="tuneline serve ready")
            traffic = _Traffic(port, bodies)
            traffic.start()
            time.sleep(1.0)  # under load
            traffic.deadline = time.monotonic() + DELAY_S + 5  # never seeing the 503 must end the test too
            traffic.signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            traffic.join()
            _, stderr = server.communicate(timeout=30)
            stopped_after = time.monotonic() - traffic.signalled
        finally:
            if server.poll() is None:
                server.kill()
        where = f"start {start + 1} of {STARTS}"
        assert traffic.noticed is not None, f"{where}: /v2/health/ready never answered 503 after SIGTERM"
        noticed_after = traffic.noticed - traffic.signalled
        assert noticed_after < 0.4, f"{where}: readiness answered 503 only {noticed_after:.2f} s after SIGTERM"
        assert traffic.live_then == 200, f"{where}: liveness answered {traffic.live_then} while draining"
        assert not traffic.errors, (f"{where}: {len(traffic.errors)} requests lost while clients were allowed to send "
                                    f"(s after SIGTERM, error): {traffic.errors[:5]}")
        assert set(traffic.statuses) == {200}, f"{where}: {traffic.statuses}"
        assert traffic.served_after_notice > 0  # the clients did keep sending after the 503, and were served
        assert server.returncode == -signal.SIGTERM, stderr[-2000:]
        assert DELAY_S <= stopped_after < DELAY_S + 5, f"{where}: stopped {stopped_after:.2f} s after SIGTERM"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_signal_skips_the_rest_of_the_drain_delay(tmp_path, onnx_model, digits, workers):
    registry = make_registry(tmp_path, onnx_model)
    port = free_port()
    server = _serve(registry, port, "serve.drain_delay_s=60", f"serve.workers={workers}")
    try:
        wait_until(lambda: server.poll() is None and _get(port, "/v2/health/ready") == 200, timeout=60,
                   what="tuneline serve ready")
        if workers == "2":  # both listening, so that each has a delay to cut short
            pids: set[str] = set()
            wait_until(lambda: len(_ready_pids(port, pids)) == 2, timeout=60, what="both workers ready")
        server.send_signal(signal.SIGTERM)
        wait_until(lambda: _get(port, "/v2/health/ready") == 503, timeout=2, what="readiness 503")
        answer = httpx.post(f"http://127.0.0.1:{port}{INFER}", content=_uint8_request(digits.images[5]))
        assert answer.status_code == 200 and answer.headers["connection"] == "close"  # still serving, unready
        assert answer.json()["outputs"][2]["data"] == [int(digits.classes[5])]
        assert _get(port, "/v2/models/mnist/ready") == 503 and _get(port, "/v2/health/live") == 200
        hurried = time.monotonic()
        server.send_signal(signal.SIGINT)  # Ctrl-C: skip the rest of the 60 s
        _, stderr = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
    assert time.monotonic() - hurried < 5
    assert server.returncode == -signal.SIGTERM, stderr[-2000:]  # ends as the first signal says
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    stops = Counter(e["event"] for e in events if e.get("event") in ("not_ready", "draining", "stopped"))
    assert stops == {"not_ready": int(workers), "draining": int(workers), "stopped": int(workers)}  # each worker's
