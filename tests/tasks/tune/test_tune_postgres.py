"""Optuna studies in a real PostgreSQL server (tests/pg_server.py): the store that lets tuning workers on
many machines share one study."""

import csv

import psycopg
import pytest

from tuneline.core.config.base import ConfigError
from tuneline.core.config.params import build_params
from tuneline.flows.environment import Environment
from tuneline.tasks.tune.stage import run_tune
from tuneline.tasks.tune.storage import storage_url
from tuneline.tasks.tune.study import create_study

FAST = {"model.arch": "seed_mlp", "train.scheduler": "none", "train.device": "cpu", "tune.epochs": 1,
        "tune.limit_train": 1000, "tune.limit_val": 250, "tune.pruner": "none"}


def test_two_worker_processes_finish_one_study_in_postgres(tmp_path, small_prepared_dir, postgres_db, monkeypatch):
    # The URL comes from the environment, as on a cluster (no password in params.yaml), read at the entry point.
    monkeypatch.setenv("TUNELINE_TUNE_STORAGE", postgres_db)
    storage = Environment.read().tune_storage
    params = build_params({}, {**FAST, "tune.n_trials": 4})
    assert storage_url(params.tune, tmp_path, storage) == postgres_db
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir", workers=2, storage=storage)

    rows = list(csv.DictReader(open(result.trials_csv)))
    assert sorted(int(r["number"]) for r in rows) == list(range(len(rows)))
    assert sum(r["state"] == "COMPLETE" for r in rows) == 4  # exactly n_trials, however the workers raced
    # A trial asked in the same instant as the last one is told FAIL, not run (tasks/tune/budget.py).
    assert all(r["reason"].startswith("not run:") for r in rows if r["state"] != "COMPLETE")
    assert not (tmp_path / "study.db").exists()  # nothing went to a local SQLite file

    # The trials are in PostgreSQL, written by two different worker processes.
    with psycopg.connect(postgres_db) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT s.study_name, count(*) FROM trials t JOIN studies s USING (study_id) "
                       "WHERE t.state = 'COMPLETE' GROUP BY s.study_name")
        ((name, complete),) = cursor.fetchall()
        cursor.execute("SELECT count(DISTINCT value_json) FROM trial_user_attributes WHERE key = 'worker'")
        (worker_pids,) = cursor.fetchone()
    assert name == result.study_name and complete == 4
    assert worker_pids == 2

    # A rerun (another machine joining late) finds the budget spent and adds nothing.
    again = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir", workers=1, storage=storage)
    assert len(list(csv.DictReader(open(again.trials_csv)))) == len(rows)


def test_an_unreachable_database_is_a_clear_error_without_the_password(postgres_server):
    url = f"postgresql://tuneline:s3cret@127.0.0.1:{postgres_server.port + 1 if postgres_server.port < 65535 else 1}/x"
    with pytest.raises(ConfigError, match=r"tune.storage: cannot open the study storage postgresql://tuneline:\*\*\*@") as info:
        create_study(build_params({}, FAST).tune, "s", url)
    assert "s3cret" not in str(info.value)
