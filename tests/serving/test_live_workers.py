"""serve.workers > 1: GET /v2/live is the server's numbers, not the answering worker's (serving/siblings.py merges
every worker's live state)."""

from __future__ import annotations

import json
import subprocess

import httpx

from tests.serving.conftest import free_port
from tests.serving.registry_helper import make_registry
from tests.serving.test_workers import ENV, REPO, TUNELINE, _wait_both_ready


def test_live_numbers_and_the_drift_window_are_every_workers(tmp_path, onnx_model, digits):
    registry = make_registry(tmp_path, onnx_model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*TUNELINE, "serve", "--registry", str(registry), "--port", str(port),
                               "-S", "serve.workers=2", "-S", "serve.drift_window=100"], cwd=REPO, env=ENV,
                              stderr=subprocess.DEVNULL)
    try:
        pids = _wait_both_ready(server, url)
        answered = []
        for i in range(40):  # a fresh connection each: the kernel spreads them over both workers
            body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                                           "data": digits.images[i].ravel().tolist()}]})
            with httpx.Client() as fresh:
                answer = fresh.post(f"{url}/v2/models/mnist/infer", content=body)
            assert answer.status_code == 200
            answered.append(answer.headers["x-tuneline-worker"])
        assert set(answered) == pids  # both workers answered some
        summaries = {}
        for _ in range(64):  # ask each worker (a fresh connection each): every one reports the server's totals
            if set(summaries) == pids:
                break
            with httpx.Client() as fresh:
                answer = fresh.get(f"{url}/v2/live/mnist")
            summaries[answer.headers["x-tuneline-worker"]] = answer.json()
        assert set(summaries) == pids
        for live in summaries.values():
            assert live["champion"]["requests"] == 40 and sum(live["champion"]["class_counts"].values()) == 40
            assert live["drift"]["window"] == 40 and live["drift"]["score"] is not None
    finally:
        server.terminate()
        server.wait(timeout=30)
