"""Shared fixtures: the real MNIST mirror, a small prepared slice, throw-away project copies, and the fast tier's
tiny synthetic data set and tiny ONNX model.

The fast tier (`make test-fast`, `-m fast`) is the tests marked `fast`: they run on synthetic data only, so none
of them may request real MNIST or PostgreSQL (checked at collection, below)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on a 2-core machine: one compute thread each (and in every
    # subprocess they start) instead of two threads per worker fighting over the same cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Servers the tests start (in-thread or `tuneline serve` subprocesses) stop without serve.drain_delay_s's wait for
# a load balancer: none routes here. The tests of the delay itself set it with -S (which beats the environment).
os.environ.setdefault("TUNELINE_SERVE_DRAIN_DELAY_S", "0")
DEFAULT_MIRROR = REPO.parent / "shared" / "data" / "MNIST" / "raw"


@pytest.fixture(scope="session", autouse=True)
def no_module_of_ours_under_two_names():
    """After the last test of a session (each xdist worker's too): no file of the package was imported under a name
    other than its `tuneline.…` one, e.g. `tasks.config` from a checkout on sys.path beside `tuneline.tasks.config`
    (two copies of every class in it). A stray shows as an error at the teardown of the session's last test."""
    yield
    from tests.module_copies import stray_modules

    strays = stray_modules({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())})
    assert not strays, "modules loaded under a second name: " + "; ".join(strays)


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    """A folder holding the four real MNIST .gz files (TUNELINE_DATA_MIRROR, else ../shared/data/MNIST/raw)."""
    mirror = Path(os.environ.get("TUNELINE_DATA_MIRROR") or DEFAULT_MIRROR)
    if not (mirror / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST mirror not found at {mirror}: set TUNELINE_DATA_MIRROR to a folder with the four .gz files")
    return mirror


def cli_env(mirror: Path) -> dict[str, str]:
    """Environment for subprocesses: this venv's tools first, analytics off, the local mirror."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(TUNELINE_DATA_MIRROR=str(mirror), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):  # each project copy gets its own embedded Prefect
        env.pop(key, None)
    return env


def make_project(dest: Path) -> Path:
    """A copy of this repository's tracked files as a fresh git + DVC project whose remote is under `dest`."""
    project = dest / "project"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        target = project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, target)
    (project / "dvc.lock").unlink(missing_ok=True)  # a clean slate: nothing has run in the copy
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=project, check=True)
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "remote", "modify", "--local", "local", "url", str(dest / "dvc-remote")], cwd=project,
                   check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return project


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path)


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """`build(folder)` run once per test session, even with xdist workers (a module fixture runs once per worker):
    the first worker to ask builds the folder under a file lock; the others wait for it and reuse it. A build
    that raised is reported, not retried, by the workers that come after."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, shared by its workers (each has its own basetemp in it)
    folder, failed = root / name, root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"{name}: building it failed in another worker: {failed.read_text()}", pytrace=False)
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException as exc:
                failed.write_text(f"{type(exc).__name__}: {exc}")
                raise
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def small_prepared_dir(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Path:
    """Real MNIST fetched once, then a stratified slice: 2,750 train / 250 val / 600 test images."""
    from tuneline.core.config.data import DataConfig
    from tuneline.tasks.data.fetch import run_fetch
    from tuneline.tasks.data.prepare import run_prepare

    base = tmp_path_factory.mktemp("mnist")
    cfg = DataConfig(limit_train=3000, limit_test=600)
    run_fetch(cfg, base / "raw", mirror=str(mnist_mirror))
    run_prepare(cfg, base / "raw", base / "prepared")
    return base / "prepared"


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_prepared_dir: Path) -> Path:
    """The default network (lean_cnn) trained for 2 epochs on the slice with the default recipe (≈95% test accuracy)."""
    from tuneline.core.config.model import ModelConfig
    from tuneline.core.config.train import TrainConfig
    from tuneline.tasks.lineage import Lineage
    from tuneline.tasks.train.loop import run_train

    out = tmp_path_factory.mktemp("model")
    run_train(ModelConfig(), TrainConfig(epochs=2, batch_size=64, device="cpu"), small_prepared_dir,
              out / "model.pt", out / "history.csv", Lineage("abc123.dir", "p" * 16, "c" * 40))
    return out / "model.pt"


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory, small_checkpoint: Path, small_prepared_dir: Path):
    """small_checkpoint evaluated and exported as the pipeline does: model.onnx, FP16 + INT8 variants, eval.json,
    export.json and the confusion picture, in one folder (an ExportResult; `.onnx_path.parent` is the folder)."""
    from tuneline.core.config.export import ExportConfig
    from tuneline.core.config.gate import GateConfig
    from tuneline.core.config.train import TrainConfig
    from tuneline.tasks.evaluate.evaluate import run_evaluate
    from tuneline.tasks.ship.export import run_export

    out = tmp_path_factory.mktemp("export")
    # Bars a 2-epoch model on a slice meets; latency generous: these tests are about files, not a loaded CPU's p99.
    gates = GateConfig(min_accuracy=0.5, min_class_recall=0.5, max_ece=0.2, max_latency_p99_ms=1000.0)
    run_evaluate(small_checkpoint, small_prepared_dir, out / "eval.json", out / "confusion.csv", gates,
                 TrainConfig(device="cpu"), confusion_png=out / "confusion.png")
    return run_export(ExportConfig(fp16=True, int8=True), small_checkpoint, small_prepared_dir, out / "eval.json",
                      out / "model.onnx", variants_dir=out / "variants", report_path=out / "export.json", gate_cfg=gates)


def require_or_skip(reason: str, variable: str | None = None) -> None:
    """Skip for a missing tool or missing data, except where it is required: under CI=true (.ci/run exports it) or
    `variable`=1 (TUNELINE_REQUIRE_POSTGRES, TUNELINE_REQUIRE_CHROMIUM) the skip is a failure. Not for GPU skips:
    CI has no GPU."""
    if os.environ.get("CI", "").lower() == "true" or (variable and os.environ.get(variable) == "1"):
        pytest.fail(f"{reason} (required here: CI=true{f' or {variable}=1' if variable else ''})", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback for the session (see tests/pg_server.py), stopped at the end."""
    from tests import pg_server

    bindir = pg_server.find_bindir()
    if bindir is None:
        reason = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` package "
                  "(`apt-get install -y postgresql`; .ci/run does)")
        require_or_skip(reason, "TUNELINE_REQUIRE_POSTGRES")
    server = pg_server.start(bindir)
    try:
        yield server
    finally:
        pg_server.stop(server)


@pytest.fixture
def postgres_db(postgres_server, request) -> str:
    """A fresh database for one test on the session's server; returns its SQLAlchemy (psycopg 3) URL."""
    import re

    from tests import pg_server

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    return pg_server.create_database(postgres_server, name)


# --- the fast tier ------------------------------------------------------------------------------------------------

# What a `fast` test must not need, and why it is not fast.
HEAVY_FIXTURES = {"mnist_mirror": "real MNIST", "real_mirror": "real MNIST", "postgres_server": "a PostgreSQL server"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A `fast` test runs on synthetic data only, in seconds: refuse one that needs real MNIST or PostgreSQL, or is
    also `slow`. (fixturenames is the whole closure: a fixture that needs MNIST counts as MNIST.)"""
    for item in items:
        if not item.get_closest_marker("fast"):
            continue
        heavy = sorted(set(HEAVY_FIXTURES) & set(getattr(item, "fixturenames", ())))
        if heavy or item.get_closest_marker("slow"):
            why = ", ".join(f"uses {name} ({HEAVY_FIXTURES[name]})" for name in heavy) or "is also marked slow"
            raise pytest.UsageError(f"{item.nodeid} is marked fast but {why}: drop one of the two")


def synthetic_image(label: int, index: int, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 grey image that says its label: a bright 6x6 block in cell `label % 16` of a 4x4 grid (jittered,
    on faint noise) that a small model learns in an epoch, and the exact label and index in the first row's
    first pixels (label low byte, label high byte, index) that a test can read back."""
    image = rng.integers(0, 48, (28, 28), dtype=np.uint8)
    row, col = divmod(label % 16, 4)
    dy, dx = rng.integers(0, 2, 2)
    image[row * 7 + dy: row * 7 + dy + 6, col * 7 + dx: col * 7 + dx + 6] = rng.integers(200, 256, (6, 6))
    image[0, :3] = (label & 0xFF, label >> 8, index & 0xFF)
    return image


def label_of(images: np.ndarray) -> np.ndarray:
    """The labels synthetic_image wrote into images [N, 28, 28] (exact where the pixels are: PNG, no resize)."""
    return images[:, 0, 0].astype(np.int64) + 256 * images[:, 0, 1].astype(np.int64)


def write_image_folder(root: Path, n_classes: int, per_class: int, seed: int = 0) -> Path:
    """An image folder of PNGs: class sub-folders c000, c001, ... (sorted = label order), `per_class` images each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width = max(3, len(str(n_classes - 1)))
    for label in range(n_classes):
        folder = root / f"c{label:0{width}d}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(synthetic_image(label, index, rng)).save(folder / f"{index:03d}.png")
    return root


TINY_CLASSES = 10
TINY_COUNTS = {"train": 1000, "t10k": 300}  # export's parity check needs 256 test images


def write_raw_dir(raw_dir: Path, n_classes: int, counts: dict[str, int], seed: int = 0) -> Path:
    """What fetch writes, made up: IDX files of synthetic_image per split stem (MNIST's train / t10k layout,
    labels cycling through the classes) and classes.json naming the classes c000, c001, ..."""
    import json

    from tuneline.tasks.data.idx import encode_idx

    rng = np.random.default_rng(seed)
    raw_dir.mkdir(parents=True)
    for stem, count in counts.items():
        labels = np.arange(count) % n_classes
        images = np.stack([synthetic_image(int(label), i, rng) for i, label in enumerate(labels)])
        (raw_dir / f"{stem}-images-idx3-ubyte").write_bytes(encode_idx(images))
        (raw_dir / f"{stem}-labels-idx1-ubyte").write_bytes(encode_idx(labels))
    (raw_dir / "classes.json").write_text(json.dumps([f"c{k:03d}" for k in range(n_classes)]))
    return raw_dir


@pytest.fixture(scope="session")
def tiny_prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic data set, prepared: 917 train / 83 val / 300 test images of 10 classes (written as
    fetch's IDX files directly: no PNG round trip, so it takes a fraction of a second)."""
    from tuneline.core.config.data import DataConfig
    from tuneline.tasks.data.prepare import run_prepare

    base = tmp_path_factory.mktemp("tiny")
    run_prepare(DataConfig(), write_raw_dir(base / "raw", TINY_CLASSES, TINY_COUNTS), base / "prepared")
    return base / "prepared"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_prepared_dir: Path) -> Path:
    """The article's MLP trained for one epoch on the tiny data set (≈100% val accuracy, a second or two)."""
    from tuneline.core.config.model import ModelConfig
    from tuneline.core.config.train import TrainConfig
    from tuneline.tasks.lineage import Lineage
    from tuneline.tasks.train.loop import run_train

    out = tmp_path_factory.mktemp("tiny-model")
    run_train(ModelConfig(arch="seed_mlp", dropout=0.0), TrainConfig(epochs=1, batch_size=64, device="cpu"),
              tiny_prepared_dir, out / "model.pt", out / "history.csv", Lineage("tiny.dir", "p" * 16, "c" * 40))
    return out / "model.pt"


@pytest.fixture(scope="session")
def tiny_onnx_model(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_prepared_dir: Path):
    """tiny_checkpoint evaluated and exported as the pipeline does (FP32 only, a short latency run): an
    ExportResult; `.onnx_path` is the file, and eval.json and export.json lie beside it."""
    from tuneline.core.config.export import ExportConfig
    from tuneline.core.config.gate import GateConfig
    from tuneline.core.config.train import TrainConfig
    from tuneline.tasks.evaluate.evaluate import run_evaluate
    from tuneline.tasks.ship.export import run_export

    out = tmp_path_factory.mktemp("tiny-export")
    gates = GateConfig(min_accuracy=0.9, min_class_recall=0.5, max_ece=0.5, max_latency_p99_ms=1000.0)
    run_evaluate(tiny_checkpoint, tiny_prepared_dir, out / "eval.json", out / "confusion.csv", gates,
                 TrainConfig(device="cpu"))
    return run_export(ExportConfig(int8=False, latency_runs=20), tiny_checkpoint, tiny_prepared_dir, out / "eval.json",
                      out / "model.onnx", report_path=out / "export.json", gate_cfg=gates)
