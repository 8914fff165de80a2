"""A study that survives faults: a trial that raises, a worker SIGKILLed mid-trial, a PostgreSQL restart mid-study.

Each ends with exactly n_trials finished (COMPLETE or PRUNED) trials, numbered without gaps or duplicates,
and every failure recorded with its reason; FAIL trials do not use up n_trials; tune.max_failures stops it.
"""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import optuna
import pytest

from tuneline.core.config.params import build_params
from tuneline.tasks.tune.stage import TuneFailedError, run_tune
from tuneline.tasks.tune.storage import storage_url
from tuneline.tasks.tune.study import create_study, study_name

FAST = {"model.arch": "seed_mlp", "train.scheduler": "none", "train.device": "cpu", "tune.epochs": 1,
        "tune.limit_train": 1000, "tune.limit_val": 250, "tune.pruner": "none",
        "tune.space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}


def read_trials(path):
    return list(csv.DictReader(open(path)))


def finished_ok(trials):
    return [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def faulty_run_train(monkeypatch, fails):
    """The real trial trainer, except that a trial whose lr makes `fails(lr)` true raises (an injected bug)."""
    import tuneline.tasks.tune.trial_run as trial_run

    real = trial_run.train_trial

    def train_trial(model_cfg, train_cfg, *args, **kwargs):
        if fails(train_cfg.lr):
            raise ValueError(f"injected fault at lr {train_cfg.lr:.5f}\nsecond line not shown")
        return real(model_cfg, train_cfg, *args, **kwargs)

    monkeypatch.setattr(trial_run, "train_trial", train_trial)


def test_failed_trials_do_not_use_up_n_trials_and_keep_their_reason(tmp_path, small_prepared_dir, monkeypatch):
    faulty_run_train(monkeypatch, lambda lr: lr > 1e-3)  # about half the log-uniform range
    params = build_params({}, {**FAST, "tune.n_trials": 4, "tune.max_failures": 20})
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    rows = read_trials(result.trials_csv)
    assert sum(r["state"] == "COMPLETE" for r in rows) == 4
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert failed, "the seeded sampler should have drawn an lr above 1e-3"
    assert all(r["reason"].startswith("ValueError: injected fault at lr") and "second line" not in r["reason"]
               for r in failed)
    assert sorted(int(r["number"]) for r in rows) == list(range(len(rows)))


def test_max_failures_stops_the_study_with_a_clear_error(tmp_path, small_prepared_dir, monkeypatch):
    faulty_run_train(monkeypatch, lambda lr: True)
    params = build_params({}, {**FAST, "tune.n_trials": 4, "tune.max_failures": 3})
    with pytest.raises(TuneFailedError, match=r"stopped: 3 trials failed in this tune call \(tune.max_failures=3\); "
                                              r"last: trial 2: ValueError: injected fault .*trials.csv"):
        run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    rows = read_trials(tmp_path / "trials.csv")
    assert [r["state"] for r in rows] == ["FAIL"] * 3
    assert all(r["reason"].startswith("ValueError: injected fault") for r in rows)


def run_in_thread(fn):
    """Run fn() in a thread; returns (thread, outcome dict with 'result' or 'error')."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_retried(tmp_path, small_prepared_dir):
    params = build_params({}, {**FAST, "tune.n_trials": 4, "tune.epochs": 4})
    url, name = storage_url(params.tune, tmp_path), study_name(params, "abc.dir")
    thread, outcome = run_in_thread(lambda: run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir",
                                                     workers=2))

    def training_trial():  # (number, worker) of a trial that has reported an epoch and has more to go
        if "result" in outcome or "error" in outcome:
            raise AssertionError(f"the study ended before a worker could be killed: {outcome}")
        # Read-only SQL: opening the study with Optuna here could race the tuner creating its tables.
        try:
            with sqlite3.connect(f"file:{tmp_path / 'study.db'}?mode=ro", uri=True) as conn:
                return conn.execute(
                    "SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                    "AND a.key = 'worker' WHERE t.state = 'RUNNING' AND EXISTS (SELECT 1 FROM trial_intermediate_values v "
                    "WHERE v.trial_id = t.trial_id)").fetchone()
        except sqlite3.OperationalError:  # no file or no tables yet
            return None

    number, worker = wait_for(training_trial, 120, "a trial in training")
    pid = int(json.loads(worker).rpartition(":")[2])
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert len(finished_ok(trials)) == 4
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    killed = trials[number]
    assert killed.state == optuna.trial.TrialState.FAIL
    # failed by the parent (it saw the exit signal) or by the other worker (the pid is gone), whichever came first
    assert killed.user_attrs["reason"].startswith(f"worker lost: process {json.loads(worker)} ")
    assert "was killed by SIGKILL" in killed.user_attrs["reason"] or "is gone" in killed.user_attrs["reason"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert len(retry) == 1 and retry[0].params == killed.params and retry[0].state.is_finished()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_a_postgres_restart_mid_study_loses_no_trial(tmp_path, small_prepared_dir, postgres_server, postgres_db):
    from tests import pg_server

    params = build_params({}, {**FAST, "tune.n_trials": 5, "tune.epochs": 3})
    name = study_name(params, "abc.dir")
    create_study(params.tune, name, postgres_db)  # the tables exist before this test polls them
    thread, outcome = run_in_thread(lambda: run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir",
                                                     storage=postgres_db))

    def complete():
        if "result" in outcome or "error" in outcome:
            raise AssertionError(f"the study ended before the restart: {outcome}")
        try:
            return len(finished_ok(optuna.load_study(study_name=name, storage=postgres_db).get_trials(deepcopy=False)))
        except KeyError:
            return 0

    wait_for(lambda: complete() >= 1, 120, "the first finished trial")
    pg_ctl = [str(pg_server.find_bindir() / "pg_ctl"), "-D", str(postgres_server.data_dir), "-w", "-t", "60"]
    # restart reuses the options the server last ran with (postmaster.opts): same port, same socket folder
    # -l: the server's output to its log file, not to our pipe (which would then never close)
    log = postgres_server.data_dir.parent / "server.log"
    try:
        down = subprocess.run(pg_server._as_server_user([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True,
                              text=True)
        assert down.returncode == 0, down.stderr
        time.sleep(3)  # the database is gone for a few seconds while the trial trains and reports
        alive_while_down = thread.is_alive()
    finally:  # the session's server comes back whatever happened: later tests share it
        up = subprocess.run(pg_server._as_server_user([*pg_ctl, "-l", str(log), "restart"]), capture_output=True,
                            text=True)
    assert up.returncode == 0, up.stderr + up.stdout
    assert alive_while_down, outcome.get("error")
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    trials = optuna.load_study(study_name=name, storage=postgres_db).trials
    assert len(finished_ok(trials)) == 5
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.fast
def test_every_storage_method_optuna_calls_through_its_cache_retries_a_lost_connection():
    """Optuna's _CachedStorage (what a Study really talks to) calls private RDBStorage methods too: a PostgreSQL
    restart that hit `_get_trials` while the tuner listed its trials failed the whole study (CI, 2026-12-02)."""
    import inspect
    import re

    from optuna.storages import _cached_storage

    from tuneline.tasks.tune.storage import _reconnecting_storage_class

    called = set(re.findall(r"_backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    storage_class = _reconnecting_storage_class()
    not_retried = {name for name in called if not hasattr(vars(storage_class).get(name), "__wrapped__")}
    # these two only read settings fixed at construction: nothing to reconnect
    assert not_retried <= {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}, sorted(not_retried)
    assert {"_get_trials", "_create_new_trial"} <= called
