"""`tuneline serve` and `tuneline predict` as a user runs them: separate processes, SIGTERM, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image

from tests.serving.conftest import free_port, wait_until
from tests.serving.registry_helper import make_registry

REPO = Path(__file__).resolve().parents[2]


def test_serve_predict_and_sigterm(tmp_path, onnx_model, digits):
    registry = make_registry(tmp_path, onnx_model)
    images = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(digits.images[i]).save(path)
        images.append(path)
    port = free_port()
    env = {**os.environ, "TUNELINE_SERVE_TOKEN": "tok", "TUNELINE_SERVE_RELOAD_POLL_S": "0.5", "PYTHONUNBUFFERED": "1"}
    tuneline = [sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO)]
    server = subprocess.Popen([*tuneline, "serve", "--registry", str(registry), "--port", str(port),
                               "-S", "serve.max_batch_size=16"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: server.poll() is None and httpx.get(url + "/v2/health/ready").status_code == 200,
                   timeout=60, what="tuneline serve ready")
        # A client needs no project: predict with --url runs from a folder without params.yaml.
        predicted = subprocess.run([sys.executable, "-m", "tuneline.flows.cli", "predict", *map(str, images), "--url", url],
                                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert predicted.returncode == 0, predicted.stderr
        lines = predicted.stdout.strip().splitlines()
        assert lines == [f"{p}: {digits.classes[i]} (p={_p(lines[i])}; mnist v0001)" for i, p in enumerate(images)]
        no_token = {k: v for k, v in env.items() if k != "TUNELINE_SERVE_TOKEN"}
        refused = subprocess.run([*tuneline, "predict", str(images[0]), "--url", url], cwd=REPO, env=no_token,
                                 capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
        # Without --url, predict finds the server where the project's params (here: the environment's port) say.
        from_project = subprocess.run([*tuneline, "predict", str(images[1])], cwd=REPO,
                                      env={**env, "TUNELINE_SERVE_PORT": str(port)}, capture_output=True, text=True,
                                      timeout=60, check=False)
        assert from_project.returncode == 0 and from_project.stdout.startswith(f"{images[1]}: {digits.classes[1]} ")
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    # uvicorn drains, shuts down, then re-raises the signal: the conventional "stopped by SIGTERM" status.
    assert server.returncode == -signal.SIGTERM, stderr[-2000:]
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    started = next(e for e in events if e.get("event") == "started")
    assert started["host"] == "127.0.0.1" and started["port"] == port and started["auth"] is True
    assert any(e.get("event") == "model_loaded" and e["version"] == "v0001" for e in events)
    assert any(e.get("event") == "request" and e["status"] == 200 for e in events)
    assert any(e.get("event") == "stopped" and e["in_flight"] == 0 for e in events)


def _p(line: str) -> str:
    return line.split("(p=")[1].split(";")[0]
