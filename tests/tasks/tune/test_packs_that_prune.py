"""Packs that prune (tasks/tune/packed_rounds.py): a freed slot is refilled at the epoch boundary, and a refilled
member trains exactly as it would alone.

Tolerance of the twins: deterministic kernels, dropout 0, CPU. A refilled member has its own epoch count, lr
schedule, optimizer step count (Adam's bias correction) and data stream (its train.seed), so per epoch its
val accuracy must be within 0.002 (less than one of the 250 val images) and its val and train loss within
1e-3 relative of the same config trained alone (train_trial, the sequential path). On this CPU they agree
to the 6 digits the history keeps; the tolerance is there for batched-kernel float order elsewhere.
"""

from collections import Counter

import optuna
import pytest

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.params import build_params
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.train.packed import Member, train_packed
from tuneline.tasks.tune.packed_rounds import optimize_packed
from tuneline.tasks.tune.space import trial_params
from tuneline.tasks.tune.stage import subset_prepared
from tuneline.tasks.tune.study import create_study
from tuneline.tasks.tune.trial_run import train_trial

ACC_TOL, LOSS_REL = 0.002, 1e-3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, small_prepared_dir):
    """512 train / 250 val real MNIST images."""
    return subset_prepared(small_prepared_dir, tmp_path_factory.mktemp("refill") / "data", 512, 250, seed=0)


def assert_twins(packed: list[dict], solo: list[dict]) -> None:
    assert [h["epoch"] for h in packed] == [h["epoch"] for h in solo]
    for mine, alone in zip(packed, solo):
        assert mine["lr"] == pytest.approx(alone["lr"], rel=1e-12)  # its own schedule position
        assert abs(mine["val_accuracy"] - alone["val_accuracy"]) <= ACC_TOL
        assert mine["val_loss"] == pytest.approx(alone["val_loss"], rel=LOSS_REL)
        assert mine["train_loss"] == pytest.approx(alone["train_loss"], rel=LOSS_REL)


def test_a_refilled_member_matches_its_solo_twin(tiny_dir):
    mlp = ModelConfig(arch="seed_mlp", dropout=0.0)
    # Adam with a step schedule: bias correction and lr both depend on the member's own step count.
    train = TrainConfig(optimizer="adam", lr=2e-3, scheduler="step", gamma=0.5, epochs=2, batch_size=64,
                        device="cpu", deterministic=True, seed=0, precision="fp32")  # a CPU pack's precision
    late = train.model_copy(update={"lr": 1.5e-3, "seed": 7})  # its own seed: its own init and batch order
    offered = []

    def refill(free, fits):
        offered.append(free)
        return [Member(mlp, late)] if len(offered) == 1 else []

    pruned_first = Member(mlp, train, on_epoch=lambda r: r["epoch"] == 1)
    results = train_packed([pruned_first, Member(mlp, train.model_copy(update={"lr": 1e-3}))], tiny_dir,
                           data_seed="own", refill=refill)
    assert [r.status for r in results] == ["pruned", "complete", "complete"]
    assert offered[0] == 1 and len(results[2].history) == 2  # joined after pack epoch 1, ran its own 2 epochs
    assert_twins(results[2].history, train_trial(mlp, late, tiny_dir, lambda r: None))


def test_a_pack_with_asha_refills_pruned_slots(tmp_path, tiny_dir):
    # ASHA's one rung is epoch 1 (tune.epochs 2, min_resource auto); the tiny lrs lose it and are pruned, and
    # trial 2 (joining when trial 1 is pruned) beats trial 0 there and runs to the end.
    lrs = [1e-3, 1e-5, 3e-3, 2e-5, 5e-4, 3e-5]
    params = build_params({}, {
        "model.arch": "seed_mlp", "model.dropout": 0.0, "train.scheduler": "none", "train.device": "cpu",
        "train.deterministic": True, "train.batch_size": 64, "tune.epochs": 2, "tune.pruner": "asha",
        "train.precision": "fp32",  # a pack on a CPU trains in fp32: so does the solo twin it is compared with
        "tune.n_trials": len(lrs), "tune.packing": 2, "tune.study_name": "refill",
        "tune.space": {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}})
    study = create_study(params.tune, "refill", f"sqlite:///{tmp_path / 'study.db'}")
    for lr in lrs:
        study.enqueue_trial({"train.lr": lr})
    optimize_packed(study, params, params.tune, tiny_dir, tmp_path, pack_size=2)

    trials = study.get_trials()
    states = Counter(t.state.name for t in trials)
    assert states["COMPLETE"] + states["PRUNED"] == len(trials) == len(lrs)  # exactly n_trials, nothing failed
    assert states["PRUNED"] >= 2
    per_pack = Counter(t.user_attrs.get("pack_id", t.number) for t in trials)  # pack_id: its pack's first trial
    assert max(per_pack.values()) > 2  # freed slots took new trials: more trials than the pack has slots
    # Every trial reported each epoch it ran, from its own epoch 1, as a sequential study's trial would.
    assert all(sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1)) for t in trials)
    # A trial that joined a running pack saw the pruner exactly as its solo twin's numbers would have it.
    refilled = next(t for t in trials if t.user_attrs["pack_id"] != t.number and t.state.name == "COMPLETE")
    assert len(refilled.intermediate_values) == 2
    twin = trial_params(params, params.tune, optuna.trial.FixedTrial(refilled.params))
    solo = train_trial(twin.model, twin.train, tiny_dir, lambda r: None)
    assert [refilled.intermediate_values[h["epoch"]] for h in solo] == pytest.approx(
        [h["val_accuracy"] for h in solo], abs=ACC_TOL)


def test_packed_failures_do_not_use_up_n_trials_and_max_failures_stops(tmp_path, tiny_dir):
    params = build_params({}, {
        "model.arch": "seed_mlp", "model.dropout": 0.0, "train.scheduler": "none", "train.device": "cpu",
        "train.optimizer": "sgd", "train.batch_size": 64, "tune.epochs": 2, "tune.pruner": "none",
        "tune.n_trials": 2, "tune.max_failures": 3, "tune.packing": 2, "tune.study_name": "failing",
        "tune.space": {"train.lr": {"type": "float", "low": 1e4, "high": 1e5, "log": True}}})  # NaN in epoch 1
    study = create_study(params.tune, "failing", f"sqlite:///{tmp_path / 'study.db'}")
    optimize_packed(study, params, params.tune, tiny_dir, tmp_path, pack_size=2)
    trials = study.get_trials()
    assert {t.state.name for t in trials} == {"FAIL"}
    # More trials than n_trials were asked: the first 2 failed and freed their places (their slots were refilled);
    # at 4 >= tune.max_failures no more were asked (a pack finishes the members it holds).
    assert 3 <= len(trials) <= 3 + 2 - 1
    assert all(t.user_attrs["reason"].startswith("diverged: train: loss diverged") for t in trials)
