"""The server runs without the training stack: with torch, torchvision, prefect, dvc and optuna unimportable
(tests/blocked_imports.py), `tuneline serve` validates params.yaml, loads a model the pipeline exported, and
`tuneline predict` and `tuneline models list` work, each through the real command line entry.

Before issue 21, `load_params` (ModelConfig's validator) imported torch, so `tuneline serve` died at start in
the serving image. tests/serving/test_serving_venv.py checks the same in a venv holding only the serving set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.blocked_imports import TRAINING_STACK, run_without_training_stack
from tests.conftest import synthetic_image

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter with the training stack blocked; argv: project folder, image, port.
SCRIPT = """
import contextlib, io, os, signal, sys, threading, time, urllib.request
from pathlib import Path

project, image, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

from tuneline.core.config.params import load_params
params = load_params(project / "params.yaml")  # ModelConfig's validator imported torch before issue 21

from tuneline.flows.cli import main
from tuneline.serving.app import create_app
from tuneline.serving.settings import build_settings
create_app(build_settings(params, project, {}, registry=project / "registry"), ["CPUExecutionProvider"])

listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    assert main(["--project", str(project), "models", "list"]) == 0
print("LIST", listing.getvalue().splitlines()[1])

def predict_then_stop():
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--project", str(project), "predict", image, "--url", f"http://127.0.0.1:{port}"])
        print("PREDICT", code, out.getvalue().strip(), flush=True)
    finally:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the server drains, then uvicorn re-raises it

threading.Thread(target=predict_then_stop, daemon=True).start()
# Ctrl-C ends the server either way: uvicorn re-raises it once drained, or returns when the signal landed while it
# was installing its handlers (seen under load in CI).
try:
    main(["--project", str(project), "serve", "--registry", str(project / "registry"), "--port", str(port),
          "--device", "cpu"])
except KeyboardInterrupt:
    pass
print("SERVE stopped")
print("LOADED", " ".join(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def test_serve_predict_and_models_list_run_with_the_training_stack_blocked(tmp_path, tiny_onnx_model):
    import onnxruntime as ort
    from PIL import Image

    from tests.serving.conftest import free_port
    from tuneline.tasks.ship.registry import Registry

    project = tmp_path / "project"
    project.mkdir()
    shutil.copyfile(REPO / "params.yaml", project / "params.yaml")
    registry = Registry(project / "registry", "mnist")
    registry.promote(registry.register({"model.onnx": tiny_onnx_model.onnx_path}, metrics={"accuracy": 1.0},
                                       gates=[], lineage={}, run_id=None))
    pixels = synthetic_image(3, 0, np.random.default_rng(7))
    Image.fromarray(pixels).save(tmp_path / "three.png")
    session = ort.InferenceSession(str(tiny_onnx_model.onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: pixels[None, None].astype(np.float32)})
    expected = f"c{int(logits.argmax()):03d}"

    run = run_without_training_stack(SCRIPT, cwd=tmp_path, timeout=180,
                                     args=[str(project), str(tmp_path / "three.png"), str(free_port())])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in run.stdout.splitlines() if " " in line}
    assert lines["LIST"].split()[:2] == ["mnist", "v0001"] and lines["LIST"].split()[-1] == "champion"
    assert lines["PREDICT"].startswith(f"0 {tmp_path / 'three.png'}: {expected} (p=")
    assert "mnist v0001" in lines["PREDICT"]
    assert lines["SERVE"] == "stopped"
    loaded = set(lines["LOADED"].split())
    assert {"tuneline", "onnxruntime", "fastapi", "uvicorn"} <= loaded and not loaded & set(TRAINING_STACK)
