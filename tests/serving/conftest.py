"""Fixtures for the server tests: a real exported ONNX model, real MNIST test digits, real servers.

Servers are real uvicorn servers on a free loopback port, in a thread of the test process; nothing about
ONNX Runtime or HTTP is mocked.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving.registry_helper import make_registry, write_other_weights


@pytest.fixture(scope="session")
def onnx_model(request, tmp_path_factory, small_checkpoint: Path, small_prepared_dir: Path) -> Path:
    """The 2-epoch seed CNN exported by tuneline.tasks.ship.export.run_export, as the pipeline's export stage writes it."""
    try:  # the export tests' session fixture, when present, saves a second export
        return Path(request.getfixturevalue("exported_model").onnx_path)
    except pytest.FixtureLookupError:
        pass
    from tuneline.core.config.export import ExportConfig
    from tuneline.core.config.gate import GateConfig
    from tuneline.core.config.train import TrainConfig
    from tuneline.tasks.evaluate.evaluate import run_evaluate
    from tuneline.tasks.ship.export import run_export

    out = tmp_path_factory.mktemp("serving-model")
    run_evaluate(small_checkpoint, small_prepared_dir, out / "eval.json", out / "confusion.csv",
                 GateConfig(min_accuracy=0.5), TrainConfig(device="cpu"), enforce=False)
    result = run_export(ExportConfig(), small_checkpoint, small_prepared_dir, out / "eval.json", out / "model.onnx")
    return result.onnx_path


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 [N, 28, 28], real MNIST test digits
    labels: np.ndarray
    logits: np.ndarray  # what ONNX Runtime gives for them, run directly on the file (the reference)

    @property
    def classes(self) -> np.ndarray:
        return self.logits.argmax(1)


def reference_logits(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """What ONNX Runtime gives for uint8 `images` [N, C, H, W] run directly on the file (CPU): the reference a
    served answer must equal."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: images.astype(np.float32)})[0]


def converted_upload(picture: bytes, mode: str, size: tuple[int, int]) -> np.ndarray:
    """What prepare makes of a picture, and so what /classify must feed the model (docs/data.md): PIL's `mode`
    ("L" or "RGB"), bilinear resize to `size` (width, height); uint8 [1, C, H, W]."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(picture)).convert(mode)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))[None]


@pytest.fixture(scope="session")
def digits(onnx_model: Path, small_prepared_dir: Path) -> Digits:
    from tuneline.tasks.data.prepare import load_split

    images, labels = (t.numpy() for t in load_split(small_prepared_dir, "test"))
    images, labels = images[:256, 0], labels[:256]  # [N, 28, 28]: MNIST is one channel; tests add the axis as clients do
    return Digits(images, labels, reference_logits(onnx_model, images[:, None]))


@dataclass(frozen=True)
class OtherModel:
    path: Path          # onnx_model with other weights (registry_helper.write_other_weights)
    logits: np.ndarray  # what ONNX Runtime gives for digits.images run directly on it


@pytest.fixture(scope="session")
def other_model(tmp_path_factory, onnx_model: Path, digits: Digits) -> OtherModel:
    """onnx_model with other weights, for reloads that must change what is served, not just the version label;
    its logits differ from onnx_model's on every digit (checked here, so no test can pass on a coincidence)."""
    path = write_other_weights(onnx_model, tmp_path_factory.mktemp("other-weights") / "model.onnx")
    logits = reference_logits(path, digits.images[:, None])
    same = [i for i in range(len(logits)) if np.allclose(logits[i], digits.logits[i], atol=1e-3)]
    assert not same, f"digits {same}: the two models give the same logits"
    return OtherModel(path, logits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    port: int
    app: object
    server: object
    thread: threading.Thread

    @property
    def holder(self):
        return self.app.state.holder

    def metric(self, text: str) -> float:
        """Sum of the /metrics samples whose line starts with `text` (a name plus, optionally, labels)."""
        body = httpx.get(self.url + "/metrics", headers=self._auth()).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(text))

    def _auth(self) -> dict:
        token = self.app.state.settings.token
        return {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@contextlib.contextmanager
def run_server(registry: Path, wait_ready: bool = True, **settings) -> Iterator[RunningServer]:
    """A real server on a free loopback port for `registry`; `settings` override ServeSettings fields."""
    import uvicorn

    from tuneline.serving.app import create_app
    from tuneline.serving.drain import DrainingServer
    from tuneline.serving.settings import ServeSettings
    from tuneline.core.onnx_session import resolve_providers

    port = free_port()
    config = ServeSettings(registry=registry, port=port, **{"access_log": False, "reload_poll_s": 0.05, "drain_delay_s": 0.0, **settings})
    app = create_app(config, resolve_providers(config.device))
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=config.shutdown_timeout_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{port}", port, app, server, thread)
    try:
        wait_until(lambda: server.started, what="server start")
        if wait_ready:
            wait_until(lambda: httpx.get(running.url + "/v2/health/ready").status_code == 200, what="ready")
        yield running
    finally:
        running.stop()


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, onnx_model: Path) -> Path:
    """Two versions of the model; v0002 is champion, v0001 is in the registry but not loaded."""
    return make_registry(tmp_path_factory.mktemp("registry"), onnx_model, versions=2)


@pytest.fixture(scope="module")
def server(registry: Path) -> Iterator[RunningServer]:
    with run_server(registry) as running:
        yield running


# --- speech and text models (tests/serving/speech_text_models.py) ------------------------------------------------
SPEECH, SENTIMENT = "speech", "sentiment"  # the registry names the speech and text models are served under


@pytest.fixture(scope="session")
def speech_model(tmp_path_factory) -> Path:
    """audio_cnn on two classes of tones (high, low), 8 kHz, 2000 samples, exported by the pipeline's export (~10 s)."""
    from tests.conftest import once_per_session
    from tests.serving.speech_text_models import build_speech_model

    return once_per_session(tmp_path_factory, "serving-speech-model", build_speech_model) / "model" / "model.onnx"


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    """text_bow on sentences (negative, positive), 16 tokens, its tokenizer in the ONNX metadata (~3 s)."""
    from tests.conftest import once_per_session
    from tests.serving.speech_text_models import build_text_model

    return once_per_session(tmp_path_factory, "serving-text-model", build_text_model) / "model" / "model.onnx"


def register_models(root: Path, models: dict[str, Path], versions: int = 1) -> Path:
    """A registry holding `versions` copies of each named model, the last one champion (the real writer)."""
    from tuneline.tasks.ship.registry import Registry

    for name, path in models.items():
        registry = Registry(root, name)
        for _ in range(versions):
            version = registry.register({"model.onnx": path}, metrics={"accuracy": 1.0}, gates=[], lineage={},
                                        run_id=None)
        registry.promote(version)
    return root


@pytest.fixture(scope="module")
def speech_text_server(tmp_path_factory, speech_model: Path, text_model: Path) -> Iterator[RunningServer]:
    """One server, REST and gRPC, serving the speech model as 'speech' and the text model as 'sentiment' (v0001
    each), serve.max_audio_s at its default (30 s). `grpc_url` is its gRPC address."""
    root = register_models(tmp_path_factory.mktemp("speech-text") / "registry",
                           {SPEECH: speech_model, SENTIMENT: text_model})
    with run_server(root, grpc_port=0) as running:
        wait_until(lambda: all(httpx.get(f"{running.url}/v2/models/{n}/ready").status_code == 200
                               for n in (SPEECH, SENTIMENT)), what="both models ready")
        running.grpc_url = f"127.0.0.1:{running.app.state.grpc_port}"
        yield running
