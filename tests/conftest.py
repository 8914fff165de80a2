"""Shared fixtures: the real MNIST mirror, a small prepared slice, and throw-away project copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on a 2-core machine: one compute thread each (and in every
    # subprocess they start) instead of two threads per worker fighting over the same cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
DEFAULT_MIRROR = REPO.parent / "shared" / "data" / "MNIST" / "raw"


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


@pytest.fixture(scope="session")
def small_prepared_dir(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Path:
    """Real MNIST fetched once, then a stratified slice: 2,750 train / 250 val / 600 test images."""
    from tasks.config import DataConfig
    from tasks.data.fetch import run_fetch
    from tasks.data.prepare import run_prepare

    base = tmp_path_factory.mktemp("mnist")
    cfg = DataConfig(limit_train=3000, limit_test=600)
    run_fetch(cfg, base / "raw", mirror=str(mnist_mirror))
    run_prepare(cfg, base / "raw", base / "prepared")
    return base / "prepared"


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_prepared_dir: Path) -> Path:
    """A seed CNN trained for 2 epochs on the slice (≈93% test accuracy, ~10 s)."""
    from tasks.config import ModelConfig, TrainConfig
    from tasks.lineage import Lineage
    from tasks.train.loop import run_train

    out = tmp_path_factory.mktemp("model")
    run_train(ModelConfig(), TrainConfig(epochs=2, batch_size=64, device="cpu"), small_prepared_dir,
              out / "model.pt", out / "history.csv", Lineage("abc123.dir", "p" * 16, "c" * 40))
    return out / "model.pt"


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory, small_checkpoint: Path, small_prepared_dir: Path):
    """small_checkpoint evaluated and exported as the pipeline does: model.onnx, FP16 + INT8 variants, eval.json,
    export.json and the confusion picture, in one folder (an ExportResult; `.onnx_path.parent` is the folder)."""
    from tasks.config import ExportConfig, GateConfig, TrainConfig
    from tasks.evaluate.evaluate import run_evaluate
    from tasks.ship.export import run_export

    out = tmp_path_factory.mktemp("export")
    # Bars a 2-epoch model on a slice meets; latency generous: these tests are about files, not a loaded CPU's p99.
    gates = GateConfig(min_accuracy=0.5, min_class_recall=0.5, max_ece=0.2, max_latency_p99_ms=1000.0)
    run_evaluate(small_checkpoint, small_prepared_dir, out / "eval.json", out / "confusion.csv", gates,
                 TrainConfig(device="cpu"), confusion_png=out / "confusion.png")
    return run_export(ExportConfig(fp16=True, int8=True), small_checkpoint, small_prepared_dir, out / "eval.json",
                      out / "model.onnx", variants_dir=out / "variants", report_path=out / "export.json", gate_cfg=gates)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback for the session (see tests/pg_server.py), stopped at the end."""
    from tests import pg_server

    bindir = pg_server.find_bindir()
    if bindir is None:
        reason = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` package "
                  "(`apt-get install -y postgresql`; .ci/run does)")
        if os.environ.get("TUNELINE_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
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
