"""Study identity: what makes two runs the same Optuna study, and what starts a new one."""

import optuna
import pytest

from tuneline.core.config.params import build_params
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.tune.stage import run_tune
from tuneline.tasks.tune.study import TRAIN_EXECUTION_KEYS, create_study, study_name

SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
FAST = {"model.arch": "seed_mlp", "train.scheduler": "none", "train.device": "cpu", "tune.space": SPACE,
        "tune.epochs": 1, "tune.limit_train": 500, "tune.limit_val": 250, "tune.pruner": "none", "tune.n_trials": 1}


def name_with(**overrides) -> str:
    return study_name(build_params({}, {**FAST, **{k.replace("__", "."): v for k, v in overrides.items()}}), "abc.dir")


def test_a_changed_prepare_setting_starts_a_new_study_and_leaves_the_old_one_alone(tmp_path, small_prepared_dir):
    # Issue 15 item 4: a run on a 3,000-image slice continued the full-data study's trials.
    full = run_tune(build_params({}, FAST), small_prepared_dir, tmp_path, data_version="abc.dir")
    sliced = run_tune(build_params({}, {**FAST, "data.limit_train": 3000}), small_prepared_dir, tmp_path,
                      data_version="abc.dir")
    assert sliced.study_name != full.study_name
    assert sliced.study_name.startswith("tuneline-mnist-3000-seed_mlp-") and full.study_name.startswith("tuneline-mnist-full-")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    for result in (full, sliced):  # each ran its own trial; neither was spent by the other
        study = optuna.load_study(study_name=result.study_name, storage=url)
        assert len(study.trials) == 1 and study.trials[0].state == optuna.trial.TrialState.COMPLETE
    identity = optuna.load_study(study_name=sliced.study_name, storage=url).user_attrs["identity"]
    assert identity["prepare"]["limit_train"] == 3000 and identity["data_version"] == "abc.dir"


@pytest.mark.parametrize("key, value", [
    ("data.limit_train", 3000), ("data.val_fraction", 0.2), ("data.seed", 1),
    ("train.weight_decay", 1e-4), ("train.optimizer", "sgd"), ("train.batch_size", 64), ("train.seed", 1),
    ("model.dropout", 0.3), ("model.arch", "seed_cnn"),
    ("tune.epochs", 2), ("tune.limit_train", 1000), ("tune.pruner", "median"), ("tune.sampler_seed", 1),
])
def test_what_a_trial_sees_is_part_of_the_identity(key, value):
    assert name_with(**{key: value}) != name_with()


@pytest.mark.parametrize("key, value", [
    ("tune.packing", 4), ("tune.packing", None), ("tune.n_trials", 20), ("tune.timeout_s", 60.0),
    ("tune.storage", "sqlite:///elsewhere.db"), ("train.device", "cuda"), ("train.compile", True),
    ("train.resume", False), ("train.precision", "bf16"), ("train.eval_batch_size", 50), ("train.epochs", 9),
    ("train.lr", 0.05),  # in the space: every trial samples its own, the fixed value is never seen
    ("data.limit_test", 100), ("data.mirror", "/elsewhere"),
])
def test_how_and_how_long_trials_run_is_not(key, value):
    assert name_with(**{key: value}) == name_with()


def test_the_data_version_is_part_of_the_identity_and_an_explicit_name_wins():
    params = build_params({}, FAST)
    assert study_name(params, "abc.dir") != study_name(params, "def.dir")
    named = build_params({}, {**FAST, "tune.study_name": "mine"})
    assert study_name(named, "abc.dir") == "mine" == study_name(named, "def.dir")


def test_execution_keys_name_real_train_settings():
    # A renamed train.* key left in this list would silently enter the identity (a new study), not break.
    fields = TrainConfig.model_fields
    assert TRAIN_EXECUTION_KEYS <= set(fields)
    # Everything but epochs (replaced by tune.epochs) is a setting all trials of a pack share: execution, not a recipe.
    assert all(fields[k].json_schema_extra["packing"] == "shared" for k in TRAIN_EXECUTION_KEYS - {"epochs"})


@pytest.mark.fast
@pytest.mark.parametrize("objectives, names", [
    (["accuracy"], ["val_accuracy"]),
    (["accuracy", "latency_p99_ms", "size_mb"], ["val_accuracy", "latency_p99_ms", "size_mb"]),
])
def test_a_study_names_its_objectives_also_when_continued_from_storage(tmp_path, objectives, names):
    # The dashboard labels its axes with these names ("Objective 0" without them).
    cfg = build_params({}, {**FAST, "tune.objectives": objectives}).tune
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert create_study(cfg, "new", url).metric_names == names
    assert optuna.load_study(study_name="new", storage=url).metric_names == names  # stored, not only in memory
    # A study made before names were set (an older release's) gets them when a run continues it.
    optuna.create_study(study_name="old", storage=url, directions=["maximize"] + ["minimize"] * (len(names) - 1))
    assert optuna.load_study(study_name="old", storage=url).metric_names is None
    create_study(cfg, "old", url)
    assert optuna.load_study(study_name="old", storage=url).metric_names == names
