"""One tuning trial trained in the worker's process, with none of a run's per-run costs.

A trial is the training engine's loop (tasks/train/epochs.py: same model build, data order, augmentation,
divergence checks, validation and early stopping as `run_train`, so a trial's numbers equal a `run_train` of
its config), minus what only a real run needs: the prepared splits are loaded once per worker process and
kept on the device for every later trial on the same data (`worker_data`), and nothing is written — no
resume checkpoint per epoch, no model file, no history file (a trial's model was thrown away anyway).
bench/bench_tune.py measured why: with short trials these were a large share of a pruned trial's cost
(docs/benchmarks.md, "Tuning: pruning and packing").

It also times itself (set-up, training, validation), which the objective records as user attributes and
the benchmark breaks down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.prepare import load_manifest
from tuneline.tasks.data.shards import data_fingerprint
from tuneline.tasks.data.stream import DataAccess
from tuneline.tasks.train.epochs import Trainee, load_data, train_epochs
from tuneline.tasks.train.loop import DivergedError, OneModel
from tuneline.tasks.train.setup import prepare_run

_DATA: dict[tuple, tuple] = {}  # this worker's prepared splits (readers): one data set at a time
SERVING_COST_IMAGES = 1024  # validation images a multi-objective trial's latency is measured on


def _data_key(prepared: Path, device: torch.device, access: DataAccess) -> tuple:
    # The files' identity, not just the folder's name: a new tune call may prepare other data at the same path.
    manifest = prepared / "manifest.json"
    return (str(prepared.resolve()), str(device), access, manifest.stat().st_mtime_ns,
            data_fingerprint(load_manifest(prepared)))


def worker_data(prepared: Path, device: torch.device, access: DataAccess = DataAccess()) -> tuple:
    """(manifest, train, val) on `device` (resident or streaming), opened on a worker's first trial and kept: every
    trial of this process, and every member of a pack, reads through the same readers."""
    key = _data_key(Path(prepared), device, access)
    if key not in _DATA:
        _DATA.clear()  # a different data set (or device): drop the old tensors first, they may be large
        _DATA[key] = load_data(Path(prepared), device, access)
    return _DATA[key]


def forget_worker_data() -> None:
    """Free the cached splits (the end of a tune call in this process)."""
    _DATA.clear()


@dataclass
class TrialTimes:
    """Where a trial's wall time went, in seconds: set-up (data, model, optimizer), training and validation."""

    setup_s: float = 0.0
    train_s: float = 0.0
    val_s: float = 0.0
    epochs: list[int] = field(default_factory=list)  # the epochs that were validated


class _TimedModel(OneModel):
    """The one-model strategy, timing its validations."""

    val_s = 0.0

    def evaluate(self, batches):
        started = time.perf_counter()
        try:
            return super().evaluate(batches)
        finally:
            self.val_s += time.perf_counter() - started


def train_trial(model_cfg: ModelConfig, cfg: TrainConfig, prepared: Path, on_epoch: Callable[[dict], None],
                times: TrialTimes | None = None,
                on_trained: Callable[[torch.nn.Module, torch.Tensor], None] | None = None,
                access: DataAccess = DataAccess()) -> list[dict]:
    """Train one trial's config on `prepared` (cached per worker) and return its per-epoch history.

    `on_epoch(record)` runs after each epoch's validation (the objective reports to the pruner there and
    raises optuna.TrialPruned to stop); a diverged run raises DivergedError, as run_train does.
    `on_trained(model, val_images)` runs once training has finished (a multi-objective study measures the model's
    serving cost there: tasks/tune/serving_cost.py).
    """
    times = times if times is not None else TrialTimes()
    started = time.perf_counter()
    with prepare_run(model_cfg, cfg, prepared, load=worker_data, access=access) as run:  # run_train's set-up, cached splits
        one = _TimedModel(run.model, cfg, run.ctx, run.device, steps_per_epoch=run.steps_per_epoch)

        def record(row: dict) -> None:
            times.epochs.append(row["epoch"])
            times.train_s = sum(h["seconds"] for h in trainee.history) - one.val_s
            times.val_s = one.val_s
            on_epoch(row)

        trainee = Trainee(cfg, on_epoch=record, track_best=False)  # a trial's weights are never kept
        times.setup_s = time.perf_counter() - started
        train_epochs(one, [trainee], run.data, "trial")
    if trainee.status == "diverged":
        raise DivergedError(trainee.reason)
    if on_trained is not None:
        on_trained(one.eval_model, run.data.val.take(SERVING_COST_IMAGES)[0])
    return trainee.history
