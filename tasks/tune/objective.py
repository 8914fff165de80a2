"""One trial trained alone: its sampled params, train_trial (tasks/tune/trial_run.py), a report to the pruner every
epoch, its timings and its failure reason."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path

from tuneline.core.config.tune import TuneConfig
from tuneline.tasks.data.stream import DataAccess
from tuneline.tasks.tune.budget import NOT_RUN, BudgetTaken, taken_before, worker_id
from tuneline.tasks.tune.space import trial_params

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

__all__ = ["make_objective", "worker_id"]


def failure_reason(exc: BaseException) -> str:
    """One line for trials.csv: the exception's type and the first line of its message."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def make_objective(base: Params, cfg: TuneConfig, prepared: Path, workdir: Path):
    """The Optuna objective: train one trial's config on `prepared`, return its best validation accuracy — and, when
    tune.objectives names serving costs, the values of each (tasks/tune/serving_cost.py), in that order.

    Trials write nothing (`workdir` is kept for callers' sake); each records user attr `times` (set-up, training
    and validation seconds). Any exception fails the trial with its reason recorded (user attr `reason`,
    trials.csv); the worker goes on (tasks/tune/workers.py), and the failure does not use up n_trials
    (tasks/tune/budget.py).
    """
    import optuna
    import torch

    from tuneline.tasks.train.loop import DivergedError
    from tuneline.tasks.tune.serving_cost import measure_trial_cost
    from tuneline.tasks.tune.study import is_multi_objective, latency_threads
    from tuneline.tasks.tune.trial_run import TrialTimes, train_trial

    multi = is_multi_objective(cfg)

    def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
        trial.set_user_attr("worker", worker_id())  # first: a worker that dies from here on is seen as lost
        if taken_before(trial.study.get_trials(deepcopy=False), trial.number) >= cfg.n_trials:
            trial.set_user_attr(NOT_RUN, True)
            trial.set_user_attr("reason", "not run: other workers had taken the last of tune.n_trials")
            raise BudgetTaken(f"trial {trial.number}: budget taken")
        params = trial_params(base, cfg, trial)
        best, times, cost = {"value": 0.0}, TrialTimes(), {}

        def report(record: dict) -> None:
            best["value"] = max(best["value"], record["val_accuracy"])
            trial.set_user_attr("epochs_run", record["epoch"])
            if multi:  # Optuna has no intermediate values (nor pruning) for multi-objective studies
                return
            trial.report(record["val_accuracy"], record["epoch"])
            # Not on the last epoch: its training is done, so pruning it would save nothing and lose a result.
            if record["epoch"] < params.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {record['epoch']}: val_accuracy {record['val_accuracy']:.4f} behind the other trials")

        def measure(model, val_images) -> None:  # after training: this trial trains no more while it measures
            cost.update(measure_trial_cost(model, val_images, params, latency_threads(base)))

        try:
            train_trial(params.model, params.train, prepared, report, times, on_trained=measure if multi else None,
                        access=DataAccess.from_config(params.data))
        except DivergedError as exc:
            trial.set_user_attr("reason", f"diverged: {exc}")
            raise
        except torch.cuda.OutOfMemoryError as exc:
            trial.set_user_attr("reason", f"out of GPU memory: {str(exc).splitlines()[0]}")
            raise
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # a bug or bad input in this config: recorded, the study goes on
            trial.set_user_attr("reason", failure_reason(exc))
            raise
        finally:  # where the trial's time went (bench/bench_tune.py breaks it down); one storage write
            trial.set_user_attr("times", {key: round(getattr(times, key), 4) for key in ("setup_s", "train_s", "val_s")})
        if multi:
            return (best["value"], *(cost[name] for name in cfg.objectives[1:]))
        return best["value"]

    return objective
