"""serve.workers: several `tuneline serve` processes on one port (SO_REUSEPORT), started and stopped by one parent."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving.conftest import free_port, wait_until
from tests.serving.registry_helper import make_registry
from tests.serving.test_operations import _uint8_request

REPO = Path(__file__).resolve().parents[2]
TUNELINE = [sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO)]
# serve.drain_delay_s 0: these stops test the workers' drain, not the delay before it (tests that do set it with -S).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNELINE_SERVE_RELOAD_POLL_S": "0.5", "TUNELINE_SERVE_THREADS": "1",
       "TUNELINE_SERVE_DRAIN_DELAY_S": "0"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_both_ready(server: subprocess.Popen, url: str) -> set[str]:
    """The two workers' pids, once each has answered ready (a fresh connection may reach either)."""
    ready: set[str] = set()

    def both_ready() -> bool:
        with httpx.Client() as fresh:
            answer = fresh.get(url + "/v2/health/ready")
        if answer.status_code == 200:
            ready.add(answer.headers["x-tuneline-worker"])
        return server.poll() is None and len(ready) == 2

    wait_until(both_ready, timeout=60, what="both workers ready")
    return ready


def _until_every_worker(pids: set[str], send) -> list[httpx.Response]:
    """Every answer to `send()` (a fresh connection each, so the kernel picks a worker each time), sent until each
    worker in `pids` has answered at least once."""
    answers = [send()]
    while {a.headers["x-tuneline-worker"] for a in answers} != pids:
        assert len(answers) < 64, [a.headers.get("x-tuneline-worker") for a in answers]
        answers.append(send())
    return answers


def _samples(text: str, name: str, endpoint: str) -> float:
    """The sum of the `name` samples (e.g. tuneline_http_requests_total) whose endpoint label is `endpoint`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and s.labels.get("endpoint") == endpoint)


def test_two_workers_share_the_port_answer_correctly_count_as_one_server_and_drain_on_sigterm(
        tmp_path, onnx_model, digits):
    registry = make_registry(tmp_path, onnx_model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*TUNELINE, "serve", "--registry", str(registry), "--port", str(port),
                               "-S", "serve.workers=2"], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        # Ready means a worker is; each fresh connection may reach either, so wait until both have answered ready.
        _wait_both_ready(server, url)
        served: Counter[str] = Counter()
        for i in range(200):  # a fresh connection each: the kernel picks the worker per connection
            image = i % len(digits.images)
            with httpx.Client() as fresh:
                answer = fresh.post(url + "/v2/models/mnist/infer", content=_uint8_request(digits.images[image]),
                                    headers={"content-type": "application/json"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"][2]["data"][0] == digits.classes[image]
            served[answer.headers["x-tuneline-worker"]] += 1
        pids = {int(p) for p in served}
        assert len(pids) == 2 and pids != {server.pid}, served  # two worker processes, not the parent
        assert min(served.values()) >= 10, served
        # /metrics counts the server's requests, whichever worker a scrape reaches: each worker answered only its
        # share of the 200, so a per-process count could never say 200. (The last answer's count lands just after
        # it is sent, hence the wait for the first scrape.)
        infer, requests = "/v2/models/{name}/infer", "tuneline_http_requests_total"
        wait_until(lambda: _samples(httpx.get(url + "/metrics").text, requests, infer) == 200, timeout=5,
                   what="a scrape that counts all 200 requests")
        scrapes = _until_every_worker({str(p) for p in pids}, lambda: httpx.get(url + "/metrics"))
        for scrape in scrapes:
            assert _samples(scrape.text, requests, infer) == 200, scrape.text
            assert _samples(scrape.text, "tuneline_http_request_duration_seconds_count", infer) == 200
            lines = scrape.text.splitlines()
            assert "tuneline_inference_requests_in_flight 0.0" in lines and "tuneline_ready 1.0" in lines
            # one line per loaded version (not one per worker), no pid label anywhere: the names of one server
            assert [line for line in lines if line.startswith("tuneline_model_info{")] == [
                'tuneline_model_info{name="mnist",provider="CPUExecutionProvider",role="champion",version="v0001"} 1.0']
            assert 'pid="' not in scrape.text
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    # The parent ends as a one-process server does (stopped by the SIGTERM it passed on); every worker drained.
    assert server.returncode == -signal.SIGTERM, stderr[-3000:]
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    started = [e for e in events if e.get("event") == "worker_started"]
    assert [e["worker"] for e in started] == [0, 1] and {e["pid"] for e in started} == pids
    assert [e["worker"] for e in events if e.get("event") == "worker_joined"] == [1]  # worker 0 listened at once
    assert sum(e.get("event") == "stopped" and e["in_flight"] == 0 for e in events) == 2
    stopped = {e["pid"]: e["returncode"] for e in events if e.get("event") == "worker_stopped"}
    assert stopped == {pid: -signal.SIGTERM for pid in pids}
    assert not any(_alive(pid) for pid in pids)
    (folder,) = {e["folder"] for e in started}  # the workers' shared folder (metrics, sockets) went with them
    assert not Path(folder).exists()


def test_repository_load_and_unload_reach_every_worker(tmp_path, onnx_model, digits):
    registry = make_registry(tmp_path, onnx_model, versions=2)  # v0002 is champion, v0001 is not loaded
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*TUNELINE, "serve", "--registry", str(registry), "--port", str(port),
                               "-S", "serve.workers=2"], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    stderr = _Stderr(server.stderr)
    repository, version = url + "/v2/repository/models/mnist", url + "/v2/models/mnist/versions/v0001"
    one = {"parameters": {"version": "v0001"}}
    info = 'tuneline_model_info{{name="mnist",provider="CPUExecutionProvider",role="{}",version="{}"}} 1.0'

    def listed() -> list[str]:  # the loaded versions /metrics lists, whichever worker answers the scrape
        scrapes = _until_every_worker(pids, lambda: httpx.get(url + "/metrics"))
        (lines,) = {tuple(line for line in scrape.text.splitlines() if line.startswith("tuneline_model_info{"))
                    for scrape in scrapes}
        return sorted(lines)

    try:
        pids = _wait_both_ready(server, url)

        def statuses() -> set[int]:  # what each worker answers to the version's ready route
            return {a.status_code for a in _until_every_worker(pids, lambda: httpx.get(version + "/ready"))}

        assert statuses() == {503}  # in the registry, loaded nowhere

        # One request (it reaches one worker) loads the version in every worker before it answers.
        loaded = httpx.post(repository + "/load", json=one, timeout=30)
        assert loaded.status_code == 200 and loaded.json()["role"] == "loaded", loaded.text
        assert statuses() == {200}
        assert listed() == [info.format("champion", "v0002"), info.format("loaded", "v0001")]
        unloaded = httpx.post(repository + "/unload", json=one, timeout=30)
        assert unloaded.status_code == 200, unloaded.text
        assert statuses() == {503}
        assert listed() == [info.format("champion", "v0002")]
        # The champion is refused by the worker that got the request, as by one process (and nothing is forwarded).
        refused = httpx.post(repository + "/unload", json={"parameters": {"version": "v0002"}})
        assert refused.status_code == 409 and "champion" in refused.json()["error"]

        # Loaded again: every worker serves it.
        assert httpx.post(repository + "/load", json=one, timeout=30).status_code == 200
        infer = lambda: httpx.post(version + "/infer", content=_uint8_request(digits.images[3]),  # noqa: E731
                                   headers={"content-type": "application/json"})
        for answer in _until_every_worker(pids, infer):
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == "v0001"
            assert answer.json()["outputs"][2]["data"][0] == digits.classes[3]
        reloaded = httpx.post(repository + "/load", timeout=30)  # an empty body: reload the champion alias everywhere
        assert reloaded.status_code == 200 and reloaded.json()["version"] == "v0002", reloaded.text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == -signal.SIGTERM, stderr.text()[-3000:]
    loads = [e for e in stderr.events() if e.get("event") == "model_loaded" and e.get("source") == "api"]
    # each worker: v0001, v0001 again, the champion
    assert Counter(e["version"] for e in loads) == {"v0001": 4, "v0002": 2}, loads


@pytest.mark.fast
def test_the_workers_channel_applies_a_request_and_names_each_worker_that_did_not(tmp_path):
    """serving/siblings.py on its own: worker 1 listens (a data plane over an empty registry, so it knows no model),
    worker 2 never started; worker 0 asks both."""
    import asyncio

    from tuneline.serving.dataplane import DataPlane
    from tuneline.serving.settings import ServeSettings
    from tuneline.serving.siblings import NotAppliedEverywhere, Siblings

    async def scenario() -> None:
        dataplane = DataPlane(ServeSettings(registry=tmp_path / "registry", access_log=False), ["CPUExecutionProvider"])
        listening = Siblings(tmp_path, index=1, count=3)
        await listening.listen(dataplane)
        try:
            with pytest.raises(NotAppliedEverywhere) as failed:
                await Siblings(tmp_path, index=0, count=3).apply("load", "mnist", "v0002")
            message = str(failed.value)
            assert message.startswith(f"load of mnist v0002: applied by this worker (pid {os.getpid()}) and 0 of its "
                                       "2 sibling workers, not by worker 1 (pid ")
            assert "404 unknown model 'mnist'" in message  # worker 1's own refusal, passed on
            assert "worker 2: 503 not listening (No such file or directory): still starting, or stopped" in message
            assert failed.value.status == 500
            # An unload that finds nothing loaded there has nothing to do there: applied.
            (answer,) = await Siblings(tmp_path, index=0, count=2).apply("unload", "mnist", "v0001")
            assert (answer.worker, answer.pid, answer.status) == (1, os.getpid(), 404)
        finally:
            listening.close()
            dataplane.executor.shutdown()

    asyncio.run(scenario())


def test_bad_worker_settings_are_one_line_errors(tmp_path, onnx_model):
    from tuneline.core.config.base import ConfigError
    from tuneline.core.config.params import load_params

    for bad in (0, 65, "two", True):
        with pytest.raises(ConfigError, match=r"^override: serve.workers: .*serve.workers takes an integer from 1 to "
                                              r"64 \(server processes\) or 'auto'"):
            load_params(REPO / "params.yaml", {"serve.workers": bad})
    registry = make_registry(tmp_path, onnx_model)  # the whole command: refused before any worker starts
    with socket.socket() as taken:  # another server's gRPC port: the workers must not silently share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        result = subprocess.run([*TUNELINE, "serve", "--registry", str(registry), "--port", "0", "--grpc-port",
                                 str(grpc_port), "-S", "serve.workers=2"], cwd=REPO, env=ENV, capture_output=True,
                                text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    expected = (f"tuneline: error: serve.grpc_port {grpc_port} on 127.0.0.1: cannot listen (Address already in use): "
                "pick another port, or 0 for any free one")
    assert result.stderr.splitlines() == [expected]


def test_a_worker_that_dies_stops_the_others_and_the_parent_fails(tmp_path, onnx_model):
    registry = make_registry(tmp_path, onnx_model)
    port = free_port()
    # The victim is the *second* worker: the parent once polled only up to the first live worker, so the second's
    # death went unseen and the parent ran on (a CI run, 2026-12-02). A short drain allowance keeps the stop quick.
    server = subprocess.Popen([*TUNELINE, "serve", "--registry", str(registry), "--port", str(port),
                               "-S", "serve.workers=2", "-S", "serve.shutdown_timeout_s=2"], cwd=REPO, env=ENV,
                              stderr=subprocess.PIPE, text=True)
    try:
        answer: list[httpx.Response] = []
        wait_until(lambda: answer.append(httpx.get(f"http://127.0.0.1:{port}/v2/health/live")) or
                   answer[-1].status_code == 200, timeout=60, what="a worker live")
        children = lambda: Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()  # noqa: E731
        wait_until(lambda: len(children()) == 2, timeout=60, what="two workers started")
        victim = int(children()[1])  # started second (the parent starts them in order)
        os.kill(victim, signal.SIGKILL)
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 1, stderr[-3000:]
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "worker_exited" and e["pid"] == victim for e in events)
    others = [e["pid"] for e in events if e.get("event") == "worker_started" and e["pid"] != victim]
    assert len(others) == 1 and not _alive(others[0])


class _Stderr:
    """A process's stderr lines, read as they come (the parent logs the ports it picked)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def _fresh_grpc(port: int):
    """A channel with a TCP connection of its own (gRPC Python channels share connections unless told not to), so
    the kernel picks a worker for it."""
    import grpc

    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def _worker(call) -> int:
    return int(dict(call.trailing_metadata())["x-tuneline-worker"])


def test_two_workers_share_the_grpc_port_each_answers_a_stock_client_and_each_goes_unready_on_sigterm(
        tmp_path, onnx_model, digits):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    registry = make_registry(tmp_path, onnx_model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*TUNELINE, "serve", "--registry", str(registry), "--port", str(port), "--grpc-port", "0",
                               "-S", "serve.workers=2", "-S", "serve.drain_delay_s=30"], cwd=REPO, env=ENV,
                              stderr=subprocess.PIPE, text=True)
    stderr = _Stderr(server.stderr)
    try:
        started = lambda: [e for e in stderr.events() if e.get("event") == "worker_started"]  # noqa: E731

        def two_started() -> bool:
            assert server.poll() is None, stderr.text()[-3000:]  # e.g. a refusal of the settings
            return len(started()) == 2

        wait_until(two_started, timeout=60, what="two workers started")
        pids = {e["pid"] for e in started()}
        (grpc_port,) = {e["grpc_port"] for e in started()}  # serve.grpc_port 0: one free port, picked by the parent
        assert grpc_port not in (0, port)
        ready: set[int] = set()

        def both_ready() -> bool:  # each worker joins both ports once ready
            with _fresh_grpc(grpc_port) as channel:
                try:
                    answer, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady.with_call(
                        service_pb2.ServerReadyRequest(), timeout=2)
                except grpc.RpcError:  # worker 0 not listening yet
                    return False
            if answer.ready:
                ready.add(_worker(call))
            return server.poll() is None and ready == pids

        wait_until(both_ready, timeout=60, what="both workers ready over gRPC")
        served: Counter[int] = Counter()
        for i in range(24):  # a new connection each: the kernel picks the worker per connection
            pixels = digits.images[i][None, None]  # uint8 [1, 1, 28, 28]
            request = service_pb2.ModelInferRequest(model_name="mnist", raw_input_contents=[pixels.tobytes()])
            request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
            with _fresh_grpc(grpc_port) as channel:
                answer, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request,
                                                                                                      timeout=10)
            assert grpcclient.InferResult(answer).as_numpy("class").tolist() == [digits.classes[i]]
            served[_worker(call)] += 1
        assert set(served) == pids, served  # both workers answered, correctly
        for i in range(4):  # and tritonclient's own client, on channels of its own
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}",
                                                  channel_args=[("grpc.use_local_subchannel_pool", 1)]) as client:
                assert client.is_server_ready() and client.is_model_ready("mnist")
                pixels = grpcclient.InferInput("pixels", [1, 1, 28, 28], "UINT8")
                pixels.set_data_from_numpy(np.ascontiguousarray(digits.images[i][None, None]))
                assert client.infer("mnist", [pixels]).as_numpy("class").tolist() == [digits.classes[i]]

        # SIGTERM: every worker says not ready at once, on both protocols, and keeps serving for the delay.
        server.send_signal(signal.SIGTERM)
        unready_rest: set[int] = set()
        unready_grpc: set[int] = set()

        def both_unready() -> bool:
            with httpx.Client() as fresh:
                answer = fresh.get(url + "/v2/health/ready")
                assert fresh.get(url + "/v2/health/live").status_code == 200
            if answer.status_code == 503:
                unready_rest.add(int(answer.headers["x-tuneline-worker"]))
            with _fresh_grpc(grpc_port) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                answer, call = stub.ServerReady.with_call(service_pb2.ServerReadyRequest(), timeout=2)
                if not answer.ready:
                    unready_grpc.add(_worker(call))
                    assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="mnist"), timeout=2).ready
                    inferred = stub.ModelInfer(request, timeout=10)  # still served during the delay
                    assert grpcclient.InferResult(inferred).as_numpy("class").tolist() == [digits.classes[23]]
            return unready_rest == pids and unready_grpc == pids

        wait_until(both_unready, timeout=15, what="both workers unready over REST and gRPC")
        hurried = time.monotonic()
        server.send_signal(signal.SIGTERM)  # a second one: the parent passes it on, the workers skip the 30 s
        server.wait(timeout=30)
        assert time.monotonic() - hurried < 10
    finally:
        if server.poll() is None:
            server.kill()
    log = stderr.text()
    assert server.returncode == -signal.SIGTERM, log[-3000:]
    events = stderr.events()
    assert sum(e.get("event") == "stopped" and e["in_flight"] == 0 for e in events) == 2
    assert not any(_alive(pid) for pid in pids)
