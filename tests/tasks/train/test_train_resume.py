"""A training process killed with SIGKILL resumes from its last epoch checkpoint and, in deterministic
mode, ends with exactly the metrics of a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import run_train

REPO = Path(__file__).resolve().parents[3]
CONFIG = dict(epochs=6, batch_size=32, device="cpu", deterministic=True, scheduler="step", gamma=0.7)
MODEL = dict(arch="seed_mlp", dropout=0.5)  # dropout: the RNG state must resume too

CHILD = """
import sys
from pathlib import Path
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import run_train
prepared, out = Path(sys.argv[1]), Path(sys.argv[2])
run_train(ModelConfig(**{model}), TrainConfig(**{config}), prepared, out / "model.pt", out / "history.csv",
          Lineage("abc123.dir", "p" * 16, "c" * 40))
"""


def comparable(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]


def test_sigkilled_run_resumes_with_identical_metrics(tmp_path, small_prepared_dir):
    killed = tmp_path / "killed"
    killed.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(model=MODEL, config=CONFIG), str(small_prepared_dir),
                              str(killed)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    resume = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not resume.exists():  # the first epoch's checkpoint: the run is now inside epoch 2
        assert child.poll() is None, "training finished or crashed before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (killed / "model.pt").exists(), "a killed run must not leave a final model"
    done_epochs = torch.load(resume, weights_only=True)["epoch"]
    assert 1 <= done_epochs < CONFIG["epochs"]

    lineage = Lineage("abc123.dir", "p" * 16, "c" * 40)
    resumed = run_train(ModelConfig(**MODEL), TrainConfig(**CONFIG), small_prepared_dir, killed / "model.pt",
                        killed / "history.csv", lineage)
    assert resumed.resumed_from_epoch == done_epochs
    assert not resume.exists(), "a finished run removes its resume checkpoint"

    straight = run_train(ModelConfig(**MODEL), TrainConfig(**CONFIG), small_prepared_dir, tmp_path / "straight.pt",
                         tmp_path / "straight.csv", lineage, checkpoint_dir=tmp_path / "straight-ckpt")
    assert straight.resumed_from_epoch == 0
    assert comparable(resumed.history) == comparable(straight.history)
    a = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "straight.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, small_prepared_dir):
    lineage = Lineage("abc123.dir", "p" * 16, "c" * 40)
    cfg = TrainConfig(epochs=1, device="cpu", scheduler="none")
    # Leave a resume checkpoint behind by stopping early... simplest: write one from a 2-epoch run's first epoch.
    ckpt = tmp_path / "ckpt"
    run_train(ModelConfig(arch="seed_mlp"), cfg, small_prepared_dir, tmp_path / "a.pt", tmp_path / "a.csv", lineage,
              checkpoint_dir=ckpt)
    assert not (ckpt / "last.pt").exists()
    other = cfg.model_copy(update={"lr": 0.01})
    torch.save({"format": "tuneline.resume/1", "key": "not-this-config", "epoch": 1}, ckpt / "last.pt")
    result = run_train(ModelConfig(arch="seed_mlp"), other, small_prepared_dir, tmp_path / "b.pt", tmp_path / "b.csv",
                       lineage, checkpoint_dir=ckpt)
    assert result.resumed_from_epoch == 0 and len(result.history) == 1
