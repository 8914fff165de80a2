"""One trial trained alone: its sampled params, run_train, a report to the pruner every epoch, its failure reason."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from tasks.config import Params, TuneConfig
from tasks.lineage import Lineage
from tasks.tune.space import trial_params


def worker_id() -> str:
    """host:pid of this process: which machine and worker ran a trial (trials.csv's `worker` column)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def make_objective(base: Params, cfg: TuneConfig, prepared: Path, workdir: Path):
    """The Optuna objective: train one trial's config on `prepared`, return its best validation accuracy."""
    import optuna
    import torch

    from tasks.train.loop import DivergedError, run_train

    def objective(trial: optuna.Trial) -> float:
        params = trial_params(base, cfg, trial)
        trial_dir = workdir / f"trial-{trial.number}"
        trial.set_user_attr("worker", worker_id())
        best = {"value": 0.0}

        def report(record: dict, _model) -> None:
            best["value"] = max(best["value"], record["val_accuracy"])
            trial.report(record["val_accuracy"], record["epoch"])
            trial.set_user_attr("epochs_run", record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {record['epoch']}: val_accuracy {record['val_accuracy']:.4f} behind the other trials")

        try:
            run_train(params.model, params.train.model_copy(update={"resume": False}), prepared,
                      trial_dir / "model.pt", trial_dir / "history.csv", Lineage("trial", "trial", "trial"),
                      checkpoint_dir=trial_dir / "ckpt", show_progress=False, on_epoch=report)
        except DivergedError as exc:
            trial.set_user_attr("reason", f"diverged: {exc}")
            raise
        except torch.cuda.OutOfMemoryError as exc:
            trial.set_user_attr("reason", f"out of GPU memory: {str(exc).splitlines()[0]}")
            raise
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        return best["value"]

    return objective
