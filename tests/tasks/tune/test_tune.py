"""The tune stage: a real Optuna study (SQLite) over real MNIST slices, pruning, failures, workers, reruns."""

import csv
import json

import pytest

from tuneline.core.config.base import ConfigError
from tuneline.core.config.params import build_params
from tuneline.tasks.tune.results import apply_best_params
from tuneline.tasks.tune.space import validate_space
from tuneline.tasks.tune.stage import run_tune

FAST = {"model.arch": "seed_mlp", "train.scheduler": "none", "train.device": "cpu", "tune.epochs": 2,
        "tune.limit_train": 1000, "tune.limit_val": 250}


def params_with(**overrides):
    return build_params({}, {**FAST, **{k.replace("__", "."): v for k, v in overrides.items()}})


def read_trials(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.parametrize("space, match", [
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, r"needs low < high"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, r"log-uniform dimension needs low > 0"),
    ({"train.optimizer": {"type": "categorical", "choices": []}}, r"non-empty `choices`"),
])
def test_bad_dimension_is_a_config_error(space, match):
    with pytest.raises(ConfigError, match=match):
        build_params({}, {"tune.space": space})


def test_unknown_choice_or_untunable_key_fails_before_any_trial():
    params = build_params({}, {"tune.space": {"train.optimizer": {"type": "categorical", "choices": ["adam", "lion"]}}})
    with pytest.raises(ConfigError, match=r"tune.space.train.optimizer: value 'lion' is not valid: .*'sgd', 'adam'"):
        validate_space(params, params.tune.space)
    params = build_params({}, {"tune.space": {"gate.min_accuracy": {"type": "float", "low": 0.1, "high": 0.2}}})
    with pytest.raises(ConfigError, match=r"'gate.min_accuracy' is not tunable"):
        validate_space(params, params.tune.space)


def finished(rows):
    return [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]


def test_study_survives_diverging_trials_prunes_and_is_not_rerun(tmp_path, small_prepared_dir):
    # Half the lr range diverges (SGD, lr 10..1000): those trials fail with their reason; the study goes on,
    # and the failures do not use up n_trials.
    space = {"train.lr": {"type": "float", "low": 0.01, "high": 1000.0, "log": True},
             "train.batch_size": {"type": "categorical", "choices": [64, 128]}}
    params = params_with(**{"tune.space": space, "train.optimizer": "sgd", "tune.n_trials": 6, "tune.epochs": 3,
                            "tune.max_failures": 30})
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    rows = read_trials(result.trials_csv)
    assert len(finished(rows)) == 6 and len(rows) == sum(result.states.values())
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert failed and all(r["reason"].startswith("diverged: train: loss diverged") for r in failed)
    assert all(float(r["train.lr"]) > 1.0 for r in failed)
    assert result.states.get("COMPLETE", 0) >= 1
    best = json.loads(result.best_params_path.read_text())
    assert best["params"] == result.best_params and best["value"] == result.best_value > 0.6
    assert (tmp_path / "history.html").stat().st_size > 10_000
    # Same data, space and budget: the study is continued, and with its trials spent runs none.
    again = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    assert again.study_name == result.study_name and read_trials(again.trials_csv) == rows
    # A larger budget continues the same study instead of starting over.
    more = run_tune(params_with(**{"tune.space": space, "train.optimizer": "sgd", "tune.n_trials": 7, "tune.epochs": 3,
                                   "tune.max_failures": 30}),
                    small_prepared_dir, tmp_path, data_version="abc.dir")
    assert more.study_name == result.study_name and len(finished(read_trials(more.trials_csv))) == 7


def test_pruner_stops_trials_that_fall_behind(tmp_path, small_prepared_dir):
    space = {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}
    params = params_with(**{"tune.space": space, "tune.n_trials": 8, "tune.epochs": 3, "tune.pruner": "median",
                            "tune.min_resource": 1})
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    rows = read_trials(result.trials_csv)
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    assert pruned and all(int(r["epochs_run"]) < 3 for r in pruned)
    assert (tmp_path / "importance.html").exists() is False  # one dimension: nothing to rank


def test_two_workers_share_one_study_without_loss_or_duplicates(tmp_path, small_prepared_dir):
    params = params_with(**{"tune.n_trials": 4, "tune.epochs": 1, "tune.pruner": "none"})
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir", workers=2)
    rows = read_trials(result.trials_csv)
    numbers = [int(r["number"]) for r in rows]
    assert sorted(numbers) == list(range(len(rows))) and len(finished(rows)) == 4
    # A trial asked in the same instant as the last one is told FAIL, not run (tasks/tune/budget.py).
    assert all(r["reason"].startswith("not run:") for r in rows if r["state"] == "FAIL")
    assert (tmp_path / "importance.html").exists()


def test_disabled_tuning_writes_an_empty_best_and_train_keeps_params(tmp_path, small_prepared_dir):
    params = params_with(**{"tune.enabled": False})
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    assert json.loads(result.best_params_path.read_text())["params"] == {}
    assert apply_best_params(params, result.best_params_path) == params


def test_best_params_are_applied_on_top_of_params(tmp_path):
    path = tmp_path / "best_params.json"
    path.write_text(json.dumps({"params": {"train.lr": 0.0042, "model.dropout": 0.3}}))
    tuned = apply_best_params(params_with(), path)
    assert tuned.train.lr == 0.0042 and tuned.model.dropout == 0.3 and tuned.model.arch == "seed_mlp"


CHILD = """
import sys
from pathlib import Path
from tuneline.core.config.params import build_params
from tuneline.tasks.tune.stage import run_tune
params = build_params({{}}, {params})
run_tune(params, Path(sys.argv[1]), Path(sys.argv[2]), data_version="abc.dir")
"""


def test_a_killed_study_continues_on_rerun_without_duplicates(tmp_path, small_prepared_dir):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import optuna
    import sqlalchemy

    # Trials of about a second (the whole train slice, 4 epochs): long enough to be caught mid-trial.
    overrides = {**FAST, "tune.n_trials": 6, "tune.epochs": 4, "tune.limit_train": None, "tune.pruner": "none"}
    repo = Path(__file__).resolve().parents[3]
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(params=overrides), str(small_prepared_dir), str(tmp_path)],
                             cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    params = build_params({}, overrides)
    from tuneline.tasks.tune.storage import storage_url
    from tuneline.tasks.tune.study import study_name

    url, name = storage_url(params.tune, tmp_path), study_name(params, "abc.dir")
    deadline = time.monotonic() + 120

    def trials_now():
        try:
            return optuna.load_study(study_name=name, storage=url).trials
        except KeyError:  # the study is not created yet
            return []
        except sqlalchemy.exc.OperationalError:  # frozen while it held the database's write lock: let it go on
            return []

    def caught_mid_trial(trials):
        # Two trials finished and one RUNNING with its params drawn (a trial killed before it drew them is retried
        # with fresh ones; a kill in the gap between two trials, a few milliseconds, would leave nothing to recover).
        finished = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.params]
        return len(finished) >= 2 and running

    # Let it finish two trials, then kill it in the middle of the next. The child is frozen (SIGSTOP) before the
    # storage is read again, so the trial seen RUNNING cannot finish between that read and the kill.
    while True:
        assert child.poll() is None and time.monotonic() < deadline, "the study ended or stalled before 2 trials"
        time.sleep(0.05)
        if not caught_mid_trial(trials_now()):
            continue
        child.send_signal(signal.SIGSTOP)
        if caught_mid_trial(trials_now()):
            break
        child.send_signal(signal.SIGCONT)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    trials = optuna.load_study(study_name=name, storage=url).trials
    done = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 6 == result.states.get("COMPLETE", 0)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # nothing lost, nothing duplicated
    # The trial the kill interrupted: failed at once by the rerun (its process is gone) and retried.
    (lost,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert lost.user_attrs["reason"].startswith("worker lost: process ") and "is gone" in lost.user_attrs["reason"]
    assert [t.params for t in trials if t.system_attrs.get("failed_trial") == lost.number] == [lost.params]
