"""Editing code a stage runs retrains, through `dvc repro` and `tuneline run`; editing serving/ does not.

The project copy's own tasks/ and flows/ are the code that runs (PYTHONPATH puts the copy first), so an
edit there is both what DVC hashes and what executes; a marker file written on import proves it ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneline.flows.params_file import write_overrides
from tuneline.core.config.overrides import parse_overrides
from tests.conftest import cli_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TINY = ["data.limit_train=1500", "data.limit_test=300", "train.epochs=1", "train.batch_size=64", "tune.enabled=false",
        "gate.min_accuracy=0.5", "gate.min_class_recall=0.3", "gate.max_ece=0.5", "export.int8=false",
        "export.latency_runs=10"]


def run(project: Path, mirror: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**cli_env(mirror), "PYTHONPATH": str(project)}
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def status(project: Path, mirror: Path) -> dict:
    return json.loads(run(project, mirror, str(BIN / "dvc"), "status", "--json").stdout or "{}")


def add_import_marker(module: Path, marker: Path) -> None:
    module.write_text(module.read_text() + f"\nimport pathlib as _p\n_p.Path({str(marker)!r}).touch()\n")


def test_editing_code_train_imports_retrains_and_editing_serving_does_not(project: Path, mnist_mirror: Path,
                                                                       tmp_path: Path):
    write_overrides(project / "params.yaml", parse_overrides(TINY))
    run(project, mnist_mirror, str(BIN / "dvc"), "repro")
    assert status(project, mnist_mirror) == {}
    train_lock = lambda: yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]  # noqa: E731

    # dvc status sees an edit to a module that only the training code imports (the old dvc.yaml missed it) ...
    first = tmp_path / "optim-imported-by-dvc-repro"
    add_import_marker(project / "tasks" / "train" / "optim.py", first)
    assert "train" in status(project, mnist_mirror)
    before = train_lock()
    # ... and `dvc repro` retrains with the edited code.
    repro = run(project, mnist_mirror, str(BIN / "dvc"), "repro", "train")
    assert "Running stage 'train'" in repro.stdout
    assert first.exists()
    optim_hash = lambda lock: next(d["md5"] for d in lock["deps"] if d["path"] == "tasks/train/optim.py")  # noqa: E731
    assert optim_hash(train_lock()) != optim_hash(before)

    # `tuneline run` does too (its Prefect cache key is built from the same deps).
    second = tmp_path / "optim-imported-by-tuneline-run"
    add_import_marker(project / "tasks" / "train" / "optim.py", second)
    out = run(project, mnist_mirror, str(BIN / "tuneline"), "run", "--no-push")
    assert second.exists()
    assert "train: done, recorded in dvc.lock" in out.stdout + out.stderr
    assert status(project, mnist_mirror) == {}

    # A change to the server retrains nothing.
    (project / "serving" / "app.py").write_text((project / "serving" / "app.py").read_text() + "\n# server edit\n")
    assert status(project, mnist_mirror) == {}
    again = run(project, mnist_mirror, str(BIN / "dvc"), "repro")
    assert "Running stage" not in again.stdout
