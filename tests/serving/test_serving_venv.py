"""The serving image's install, for real: a venv holding only the serving requirement set
(`infra/requirements.py --serving`) and the package installed without dependencies from the files
infra/serving.Dockerfile copies, as its build does. There `tuneline serve` loads a registry the pipeline's
writer made (a model trained on an MNIST slice), answers V2 REST and a stock `tritonclient.grpc` inference,
and `tuneline predict` classifies an image; torch is not importable.

Before issue 21 `tuneline serve` died there at start with ModuleNotFoundError: torch (load_params imported it).
Building the venv takes about a minute (pip, from the local index and cache); it is built once per session.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.blocked_imports import TRAINING_STACK
from tests.infra.infra_files import instructions
from tests.serving.conftest import free_port, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "serving.Dockerfile"
BUILD = "/tmp/build"  # where the Dockerfile gathers the package's files before `pip install --no-deps`


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, (f"{shlex.join(map(str, command))} failed:\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


def gather_build_files(target: Path) -> None:
    """Copy what the Dockerfile's COPY instructions put under /tmp/build into `target`, as `docker build` does."""
    for key, args in instructions(DOCKERFILE):
        words = shlex.split(args)
        if key != "COPY" or not words[-1].startswith(BUILD):
            continue
        *sources, dest = words
        for source in sources:
            path = target / dest.removeprefix(BUILD).strip("/")
            path = path / Path(source).name if dest.endswith("/") else path
            path.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, path, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copyfile(REPO / source, path)


@pytest.fixture(scope="session")
def serving_venv(tmp_path_factory) -> Path:
    """The venv (its bin/ folder): the serving requirement set, then the package with --no-deps (not editable)."""
    base = tmp_path_factory.mktemp("serving-venv")
    build, venv = base / "build", base / "venv"
    gather_build_files(build)
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    requirements = _run([str(python), str(build / "requirements.py"), "--serving", str(build / "pyproject.toml")])
    (build / "requirements.txt").write_text(requirements.stdout)
    started = time.monotonic()
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check"]
    _run([*pip, "-r", str(build / "requirements.txt")], timeout=900)
    _run([*pip, "--no-deps", str(build)], timeout=300)
    print(f"serving venv built in {time.monotonic() - started:.0f} s")
    return venv / "bin"


def test_the_serving_install_serves_a_pipeline_registry_without_torch(serving_venv, tmp_path, onnx_model, digits):
    import tritonclient.grpc as grpcclient

    from tuneline.tasks.ship.registry import Registry

    python = serving_venv / "python"
    for package in TRAINING_STACK:  # the point of the serving set
        found = subprocess.run([str(python), "-c", f"import {package}"], capture_output=True, text=True, cwd=tmp_path)
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, f"{package} is importable"
    where = _run([str(python), "-c", "import tuneline.serving, tuneline.core; print(tuneline.serving.__file__)"],
                 cwd=tmp_path).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(REPO)), where  # a real install, not the checkout

    project = tmp_path / "project"
    project.mkdir()
    shutil.copyfile(REPO / "params.yaml", project / "params.yaml")
    registry = Registry(project / "registry", "mnist")  # the pipeline's writer, as `tuneline run` registers
    registry.promote(registry.register({"model.onnx": onnx_model}, metrics={"accuracy": 0.99}, gates=[],
                                       lineage={}, run_id=None))
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNELINE_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{serving_venv}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "serve.log"  # a file, not a pipe: nobody reads a pipe while the server logs each request
    with open(log, "w") as out:
        server = subprocess.Popen([str(serving_venv / "tuneline"), "serve", "--registry", str(project / "registry"),
                                   "--port", str(port), "--grpc-port", str(grpc_port), "--device", "cpu"],
                                  cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert server.poll() is None, f"tuneline serve exited {server.returncode}: {log.read_text()[-3000:]}"
            return httpx.get(url + "/v2/health/ready").status_code == 200

        wait_until(ready, what="tuneline serve ready", timeout=120)
        rows = digits.images[:8, None].astype(np.float32)  # [N, 1, 28, 28]
        body = {"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.ravel().tolist()}]}
        answer = httpx.post(url + "/v2/models/mnist/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        logits = next(o for o in answer.json()["outputs"] if o["name"] == "logits")
        np.testing.assert_array_equal(np.asarray(logits["data"]).reshape(8, -1).argmax(1), digits.classes[:8])

        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as triton:
            tensor = grpcclient.InferInput("pixels", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            result = triton.infer("mnist", [tensor], outputs=[grpcclient.InferRequestedOutput("logits")])
            np.testing.assert_array_equal(result.as_numpy("logits").argmax(1), digits.classes[:8])

        image = tmp_path / "digit.png"
        Image.fromarray(digits.images[0]).save(image)
        predicted = _run([str(serving_venv / "tuneline"), "predict", str(image), "--url", url], cwd=tmp_path,
                         env=env, timeout=60)
        assert predicted.stdout.startswith(f"{image}: {digits.classes[0]} (p=") and "mnist v0001" in predicted.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    assert server.returncode == -signal.SIGTERM, log.read_text()[-2000:]  # drained, then stopped by the signal
