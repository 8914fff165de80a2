"""A tuning trial (tasks/tune/trial_run.py): run_train's numbers, the worker's data loaded once, nothing written."""

from pathlib import Path

import pytest

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import run_train
from tuneline.tasks.tune import trial_run
from tuneline.tasks.tune.trial_run import TrialTimes, forget_worker_data, train_trial


def test_a_trial_trains_exactly_as_run_train_and_writes_nothing(tiny_prepared_dir: Path, tmp_path: Path):
    model_cfg = ModelConfig(arch="seed_mlp", dropout=0.2)
    cfg = TrainConfig(epochs=2, batch_size=64, device="cpu", deterministic=True, scheduler="none",
                      augment_rotate_deg=5.0)
    solo = run_train(model_cfg, cfg, tiny_prepared_dir, tmp_path / "m.pt", tmp_path / "h.csv", Lineage("t", "t", "t"),
                     show_progress=False)
    before = sorted(tiny_prepared_dir.rglob("*"))
    seen, times = [], TrialTimes()
    history = train_trial(model_cfg, cfg, tiny_prepared_dir, seen.append, times)
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")
    assert [{k: h[k] for k in keys} for h in history] == [{k: h[k] for k in keys} for h in solo.history]
    assert [r["epoch"] for r in seen] == [1, 2] and times.epochs == [1, 2]
    assert times.setup_s > 0 and times.train_s > 0 and times.val_s > 0
    assert sorted(tiny_prepared_dir.rglob("*")) == before  # nothing written beside the data


def test_the_worker_loads_the_splits_once_and_reloads_changed_data(tiny_prepared_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    forget_worker_data()
    loads = []
    real = trial_run.load_data
    monkeypatch.setattr(trial_run, "load_data", lambda *a: loads.append(a) or real(*a))
    cfg = TrainConfig(epochs=1, batch_size=128, device="cpu", scheduler="none")
    for lr in (1e-3, 3e-3):
        train_trial(ModelConfig(arch="seed_mlp"), cfg.model_copy(update={"lr": lr}), tiny_prepared_dir, lambda r: None)
    assert len(loads) == 1  # the second trial reused the first one's tensors

    import shutil

    other = tmp_path / "prepared"
    shutil.copytree(tiny_prepared_dir, other)
    train_trial(ModelConfig(arch="seed_mlp"), cfg, other, lambda r: None)
    (other / "manifest.json").touch()  # prepared again in place: a new data set at the same path
    train_trial(ModelConfig(arch="seed_mlp"), cfg, other, lambda r: None)
    assert len(loads) == 3
    forget_worker_data()
