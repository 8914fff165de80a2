"""Data-parallel training with torchrun: `tuneline stage train --nproc-per-node 2` runs two gloo
DistributedDataParallel processes on this CPU. The global batch keeps single-process semantics, so with
no dropout or augmentation (the only per-rank randomness) the two must reach the accuracy of one process
to within 1 point; and a run interrupted in one process resumes in two."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneline.core.config.params import load_params
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import run_train
from tests.conftest import cli_env

pytestmark = pytest.mark.slow
TOLERANCE = 0.01  # accuracy, absolute: same updates up to float summation order
OVERRIDES = {"tune.enabled": False, "model.arch": "seed_mlp", "model.dropout": 0.0, "train.device": "cpu",
             "train.batch_size": 64, "train.scheduler": "none", "train.deterministic": True,
             # Augmentation draws per rank: the two processes would see other images than the one process does.
             "train.augment_rotate_deg": 0.0, "train.augment_translate": 0.0, "train.augment_scale": 0.0}


@pytest.fixture
def ddp_project(project: Path, small_prepared_dir: Path) -> Path:
    """The project with the small real-MNIST slice in place of fetch + prepare (the raw files name the data)."""
    shutil.copytree(small_prepared_dir.parent / "raw", project / "data" / "raw")
    shutil.copytree(small_prepared_dir, project / "data" / "prepared")
    return project


def stage_train(project: Path, mirror: Path, nproc: int, epochs: int) -> subprocess.CompletedProcess:
    sets = [arg for key, value in {**OVERRIDES, "train.epochs": epochs}.items() for arg in ("-S", f"{key}={value}")]
    return subprocess.run([str(Path(sys.executable).parent / "tuneline"), "stage", "train", "--nproc-per-node",
                           str(nproc), *sets], cwd=project, env=cli_env(mirror), capture_output=True, text=True,
                          timeout=600)


def single_process(project: Path, epochs: int, out: Path, on_epoch=None):
    params = load_params(project / "params.yaml", {**OVERRIDES, "train.epochs": epochs})
    return run_train(params.model, params.train, project / "data" / "prepared", out / "model.pt", out / "history.csv",
                     Lineage("d", "p", "c"), checkpoint_dir=project / "models" / "checkpoints", show_progress=False,
                     on_epoch=on_epoch)


def history(project: Path) -> list[dict]:
    return list(csv.DictReader(open(project / "metrics" / "train_history.csv")))


def test_two_gloo_processes_match_one_and_resume_its_checkpoint(ddp_project: Path, mnist_mirror: Path, tmp_path: Path):
    one = single_process(ddp_project, 2, tmp_path / "one")

    done = stage_train(ddp_project, mnist_mirror, nproc=2, epochs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DistributedDataParallel over 2 processes (gloo)" in done.stderr
    assert done.stderr.count("train: epoch 2/2") == 1  # rank 0 speaks for the job
    two = history(ddp_project)
    assert [int(h["epoch"]) for h in two] == [1, 2]
    print("val_accuracy one process:", [h["val_accuracy"] for h in one.history],
          "two:", [float(h["val_accuracy"]) for h in two])
    for mine, theirs in zip(two, one.history):
        assert abs(float(mine["val_accuracy"]) - theirs["val_accuracy"]) <= TOLERANCE, (two, one.history)
        assert abs(float(mine["train_loss"]) - theirs["train_loss"]) <= 0.02
    model = torch.load(ddp_project / "models" / "model.pt", weights_only=False)
    assert not any(key.startswith("module.") for key in model["state_dict"])  # the bare model, not the DDP wrapper
    assert not (ddp_project / "models" / "checkpoints" / "last.pt").exists()

    # A one-process run of 3 epochs dies after epoch 1's checkpoint; two processes pick it up at epoch 2.
    def crash(record: dict, _model) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        single_process(ddp_project, 3, tmp_path / "crashed", on_epoch=crash)
    assert (ddp_project / "models" / "checkpoints" / "last.pt").is_file()
    resumed = stage_train(ddp_project, mnist_mirror, nproc=2, epochs=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train: resuming from" in resumed.stderr and "after epoch 1" in resumed.stderr
    assert [int(h["epoch"]) for h in history(ddp_project)] == [1, 2, 3]
    assert float(history(ddp_project)[-1]["val_accuracy"]) >= float(two[-1]["val_accuracy"]) - TOLERANCE


@pytest.mark.parametrize("args, message", [(["stage", "prepare", "--nproc-per-node", "2"], "applies to the train stage only"),
                                           (["stage", "train", "--nproc-per-node", "0"], "must be at least 1")])
def test_nproc_applies_to_train_only_and_must_be_positive(tmp_path: Path, args, message, capsys, monkeypatch):
    from tuneline.flows.cli import main

    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    for key in ("PREFECT_HOME", "DVC_SITE_CACHE_DIR"):  # main() sets these for the project; keep ours
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    assert main(["--project", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_nproc_from_the_environment():
    from tuneline.tasks.train.distributed import nproc_from_env

    assert nproc_from_env(None) == 1 and nproc_from_env("") == 1 and nproc_from_env("4") == 4
    assert nproc_from_env("auto") == max(1, torch.cuda.device_count())  # every visible GPU, 1 on a CPU host
    with pytest.raises(ValueError, match=r"TUNELINE_NPROC_PER_NODE='two': expected a number of processes or `auto`"):
        nproc_from_env("two")
