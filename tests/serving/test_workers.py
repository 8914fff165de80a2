"""serve.workers: several `tuneline serve` processes on one port (SO_REUSEPORT), started and stopped by one parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import free_port, wait_until
from tests.serving.registry_helper import make_registry
from tests.serving.test_operations import _uint8_request

REPO = Path(__file__).resolve().parents[2]
TUNELINE = [sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO)]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNELINE_SERVE_RELOAD_POLL_S": "0.5", "TUNELINE_SERVE_THREADS": "1"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_share_the_port_answer_correctly_and_drain_on_sigterm(tmp_path, onnx_model, digits):
    registry = make_registry(tmp_path, onnx_model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*TUNELINE, "serve", "--registry", str(registry), "--port", str(port),
                               "-S", "serve.workers=2"], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        # Ready means a worker is; each fresh connection may reach either, so wait until both have answered ready.
        ready: set[str] = set()

        def both_ready() -> bool:
            with httpx.Client() as fresh:
                answer = fresh.get(url + "/v2/health/ready")
            if answer.status_code == 200:
                ready.add(answer.headers["x-tuneline-worker"])
            return server.poll() is None and len(ready) == 2

        wait_until(both_ready, timeout=60, what="both workers ready")
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
        # unload would reach one worker only: refused, in JSON, after the admin checks (loopback here)
        refused = httpx.post(url + "/v2/repository/models/mnist/unload", json={"parameters": {"version": "v0001"}})
        assert refused.status_code == 409 and "serve.workers" in refused.json()["error"]
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


def test_bad_worker_settings_are_one_line_errors(tmp_path, onnx_model):
    from tuneline.core.config.base import ConfigError
    from tuneline.core.config.params import load_params

    with pytest.raises(ConfigError, match=r"serve.workers: Input should be greater than or equal to 1"):
        load_params(REPO / "params.yaml", {"serve.workers": 0})
    registry = make_registry(tmp_path, onnx_model)  # the whole command: refused before any worker starts
    result = subprocess.run([*TUNELINE, "serve", "--registry", str(registry), "--port", "0", "--grpc-port", "0",
                             "-S", "serve.workers=2"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2, result.stderr
    expected = ("tuneline: error: serve.workers=2 with serve.grpc_port=0: gRPC is served by one process only; set "
                "serve.workers=1 to serve gRPC, or serve.grpc_port=null")
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
