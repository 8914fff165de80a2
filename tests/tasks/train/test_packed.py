"""Packed trials (tasks/train/packed.py): K configs in one process on real MNIST slices, against run_train and Optuna.

Tolerance of the twin test: a packed model runs batched kernels (grouped convolutions, batched matmuls)
whose float32 sums are ordered differently from a single model's, so gradients differ by ~1e-7 relative.
SGD keeps that difference small (weights within 1e-5 after two epochs); Adam, L1 (sign of near-zero
weights) and batch norm amplify it, so for them the metrics are compared: val accuracy within 0.5 points
(one image of the 250), losses within 1%.
"""

import csv
import json
import logging

import pytest
import torch

from tuneline.core.config.base import ConfigError
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.params import build_params
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.model.architectures import ModelArgs, build_model
from tuneline.tasks.train.packed import Member, group_key, pack_capacity, train_packed
from tuneline.tasks.data.prepare import load_manifest, load_split
from tuneline.tasks.train.loop import run_train
from tuneline.tasks.tune.stage import run_tune, subset_prepared
from tuneline.tasks.tune.study import study_name

TIMING = ("seconds", "images_per_s")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, small_prepared_dir):
    """768 train / 250 val real MNIST images (a stratified slice of the session's small slice)."""
    return subset_prepared(small_prepared_dir, tmp_path_factory.mktemp("packed") / "data", 768, 250, seed=0)


def untimed(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def init_state(model_cfg, train_cfg, prepared):
    """The weights run_train starts from: its seed, then the model."""
    manifest = load_manifest(prepared)
    torch.manual_seed(train_cfg.seed)
    return build_model(ModelArgs(arch=model_cfg.arch, dropout=model_cfg.dropout, n_classes=10, image_shape=(1, 28, 28),
                                 **manifest["normalization"])).state_dict()


TWINS = {
    # Every per-model knob away from its default, so the twin checks each one's implementation.
    "mlp-sgd": (ModelConfig(arch="seed_mlp", dropout=0.0),
                TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4,
                            scheduler="cosine", warmup_epochs=0.5)),
    "mlp-adam": (ModelConfig(arch="seed_mlp", dropout=0.0),
                 TrainConfig(optimizer="adam", lr=2e-3, beta1=0.8, weight_decay=1e-4, l1=1e-5, label_smoothing=0.1,
                             grad_clip=1.0, scheduler="step", gamma=0.5)),
    "bn_cnn-sgd": (ModelConfig(arch="bn_cnn", dropout=0.0),
                   TrainConfig(optimizer="sgd", lr=0.02, scheduler="onecycle")),
}


@pytest.mark.parametrize("name", list(TWINS))
def test_a_packed_member_matches_its_solo_twin(name, tiny_dir, tmp_path):
    # Deterministic kernels, dropout 0 (a pack draws its dropout masks for all its models at once, so they
    # cannot equal a solo run's draws); the twin's seed is the pack's data seed: same init, same data order.
    model_cfg, train = TWINS[name]
    # fp32: a pack on a CPU trains in fp32. The default weight average (train.ema) stays on: the twins compare it too.
    train = train.model_copy(update={"epochs": 2, "batch_size": 64, "device": "cpu", "deterministic": True,
                                     "channels_last": False, "seed": 0, "precision": "fp32"})
    solo = run_train(model_cfg, train, tiny_dir, tmp_path / "m.pt", tmp_path / "h.csv", Lineage("t", "t", "t"),
                     show_progress=False)
    others = [train.model_copy(update={"lr": train.lr * 3, "seed": 5}),
              train.model_copy(update={"lr": train.lr / 2, "weight_decay": 0.0, "label_smoothing": 0.0, "seed": 9})]
    packed = train_packed([Member(model_cfg, c) for c in (others[0], train, others[1])], tiny_dir, data_seed=0,
                          keep_states=True)[1]
    assert packed.status == "complete" and len(packed.history) == len(solo.history) == 2
    for mine, theirs in zip(packed.history, solo.history):
        assert mine["lr"] == theirs["lr"]
        assert abs(mine["val_accuracy"] - theirs["val_accuracy"]) <= 0.005
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=0.01)
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.01)
    saved = torch.load(tmp_path / "m.pt", weights_only=False)["state_dict"]
    assert saved.keys() == packed.state.keys()
    if name == "mlp-sgd":
        assert max((saved[k] - packed.state[k]).abs().max().item() for k in saved) < 1e-5
    if name == "bn_cnn-sgd":  # batch-norm running statistics are per model and were updated
        start = init_state(model_cfg, train, tiny_dir)
        assert not torch.equal(packed.state["net.features.1.running_mean"], start["net.features.1.running_mean"])
        assert packed.state["net.features.1.running_mean"] == pytest.approx(saved["net.features.1.running_mean"],
                                                                            abs=0.05)


def test_per_trial_hyperparameters_take_effect(tiny_dir):
    mlp = ModelConfig(arch="seed_mlp", dropout=0.0)
    base = TrainConfig(optimizer="adam", lr=2e-3, epochs=2, batch_size=64, scheduler="none", device="cpu", seed=0,
                       ema=0.0)  # the live weights, where each knob acts
    configs = {
        "base": (mlp, base),
        "frozen": (mlp, base.model_copy(update={"lr": 1e-30, "seed": 1})),  # lr > 0 is required; 1e-30 moves nothing
        "decay": (mlp, base.model_copy(update={"optimizer": "adamw", "weight_decay": 20.0})),
        "l1": (mlp, base.model_copy(update={"l1": 1e-3})),
        "smooth": (mlp, base.model_copy(update={"label_smoothing": 0.4})),
        "dropout": (ModelConfig(arch="seed_mlp", dropout=0.7), base),
        "step": (mlp, base.model_copy(update={"scheduler": "step", "gamma": 0.1})),
        "beta": (mlp, base.model_copy(update={"beta1": 0.0})),
    }
    results = dict(zip(configs, train_packed([Member(m, t) for m, t in configs.values()], tiny_dir, keep_states=True)))
    state = {name: r.state for name, r in results.items()}
    weight = "net.layers.1.weight"

    # Seed: the frozen member starts from seed 1's weights (not seed 0's) and, with lr ~ 0, stays exactly there.
    start = init_state(mlp, configs["frozen"][1], tiny_dir)
    assert all(torch.equal(state["frozen"][k], start[k]) for k in start)
    assert not torch.equal(start[weight], init_state(mlp, base, tiny_dir)[weight])
    assert not torch.equal(state["base"][weight], init_state(mlp, base, tiny_dir)[weight])
    # Decoupled weight decay and L1 shrink the weights; label smoothing lowers confidence; dropout raises train loss.
    norm = {name: s[weight].norm().item() for name, s in state.items()}
    assert norm["decay"] < 0.5 * norm["base"]
    assert state["l1"][weight].abs().sum() < 0.8 * state["base"][weight].abs().sum()
    assert confidence(state["smooth"], tiny_dir) < confidence(state["base"], tiny_dir) - 0.1
    train_loss = {name: r.history[-1]["train_loss"] for name, r in results.items()}
    assert train_loss["dropout"] > train_loss["base"] + 0.05
    # Schedule: a per-model lr multiplier (step, gamma 0.1: the second epoch runs at a tenth).
    assert [h["lr"] for h in results["step"].history] == pytest.approx([2e-3, 2e-4])
    assert [h["lr"] for h in results["base"].history] == [2e-3, 2e-3]
    # Betas: Adam without momentum (beta1 0) ends elsewhere than the default.
    assert (state["beta"][weight] - state["base"][weight]).abs().max() > 1e-3


@torch.no_grad()
def confidence(state, prepared):
    """Mean top softmax probability of a seed MLP with `state` on the val split."""
    import numpy as np

    model = build_model(ModelArgs(arch="seed_mlp", dropout=0.0, n_classes=10, image_shape=(1, 28, 28),
                                  **load_manifest(prepared)["normalization"]))
    model.load_state_dict(state)
    images = load_split(prepared, "val")[0].float()
    return model.eval()(images).softmax(1).max(1).values.mean().item()


def test_a_diverging_member_fails_alone_and_leaves_the_others_untouched(tiny_dir):
    mlp = ModelConfig(arch="seed_mlp", dropout=0.0)
    good = TrainConfig(optimizer="sgd", lr=0.05, epochs=2, batch_size=64, scheduler="none", device="cpu",
                       deterministic=True)
    other = good.model_copy(update={"lr": 0.02, "seed": 1})
    bad = good.model_copy(update={"lr": 1e4})  # NaN within the first epoch
    ended = []
    with_bad = train_packed([Member(mlp, good), Member(mlp, bad, on_end=ended.append), Member(mlp, other)], tiny_dir,
                            keep_states=True)
    without = train_packed([Member(mlp, good), Member(mlp, other)], tiny_dir, keep_states=True)
    assert with_bad[1].status == "diverged" and with_bad[1].reason.startswith("train: loss diverged to nan in epoch 1")
    assert ended == [with_bad[1]] and with_bad[1].history == [] and with_bad[1].state is None
    for mine, alone in zip((with_bad[0], with_bad[2]), without):
        assert mine.status == alone.status == "complete"
        assert untimed(mine.history) == untimed(alone.history)  # bit for bit: its slices never met the NaNs
        assert all(torch.equal(mine.state[k], alone.state[k]) for k in alone.state)


def test_pruned_members_leave_and_packs_refuse_mixed_shapes(tiny_dir):
    mlp = ModelConfig(arch="seed_mlp", dropout=0.0)
    base = TrainConfig(epochs=3, batch_size=64, scheduler="none", device="cpu")
    seen = []
    members = [Member(mlp, base, on_epoch=lambda r: seen.append(("a", r["epoch"])) or r["epoch"] == 1),
               Member(mlp, base.model_copy(update={"epochs": 2, "lr": 3e-3}),
                      on_epoch=lambda r: seen.append(("b", r["epoch"])))]
    pruned, short = train_packed(members, tiny_dir)
    assert pruned.status == "pruned" and len(pruned.history) == 1
    assert short.status == "complete" and len(short.history) == 2
    assert seen == [("a", 1), ("b", 1), ("b", 2)]
    # adam and adamw share a pack; another batch size or architecture does not.
    assert group_key(mlp, base) == group_key(mlp, base.model_copy(update={"optimizer": "adamw", "lr": 0.1, "seed": 3}))
    assert group_key(mlp, base) != group_key(mlp, base.model_copy(update={"batch_size": 128}))
    with pytest.raises(ValueError, match=r"cannot share a pack \(batch_size: 64 vs 128\)"):
        train_packed([Member(mlp, base), Member(mlp, base.model_copy(update={"batch_size": 128}))], tiny_dir)


def test_pack_size_is_capped_by_memory_with_a_message(tiny_dir, caplog):
    mlp, train = ModelConfig(arch="seed_mlp"), TrainConfig(batch_size=256, device="cpu")
    assert pack_capacity(mlp, train, tiny_dir, requested=4) == 4  # ~2 MiB per model: plenty of RAM here
    with caplog.at_level(logging.WARNING, logger="tuneline.tasks.train.packed"):
        capped = pack_capacity(mlp, train, tiny_dir, requested=64, available=40 * 2**20)
    assert 1 <= capped < 64
    assert f"64 models per pack capped to {capped}: each seed_mlp model needs ~" in caplog.text
    assert "lower train.batch_size or tune.packing" in caplog.text


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (4, 4), (1, 1), (None, None), (8.0, 8)])
def test_packing_setting(value, expected):
    assert build_params({}, {"tune.packing": value}).tune.packing == expected


@pytest.mark.parametrize("value", [0, -3, True, "four", 2.5])
def test_bad_packing_setting_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"tune.packing takes an integer K >= 2 .* or null / 1 \(off\)"):
        build_params({}, {"tune.packing": value})


def test_a_packed_study_gives_the_outputs_of_an_unpacked_one(tmp_path, small_prepared_dir):
    import optuna

    # SGD over lr 0.003..100: the top of the range diverges inside packs; ASHA prunes from the first rung.
    space = {"train.lr": {"type": "float", "low": 0.003, "high": 100.0, "log": True},
             "train.momentum": {"type": "float", "low": 0.0, "high": 0.9},
             "model.dropout": {"type": "float", "low": 0.0, "high": 0.5}}
    overrides = {"model.arch": "seed_mlp", "train.scheduler": "none", "train.device": "cpu", "train.optimizer": "sgd",
                 "train.batch_size": 32, "tune.limit_train": 1000, "tune.limit_val": 250, "tune.space": space,
                 "tune.n_trials": 12, "tune.epochs": 3, "tune.pruner": "asha", "tune.packing": 4}
    params = build_params({}, overrides)
    unpacked = build_params({}, {**overrides, "tune.packing": None})
    assert study_name(params, "abc.dir") == study_name(unpacked, "abc.dir")  # packing is no part of it
    result = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    rows = list(csv.DictReader(open(result.trials_csv)))
    assert len(rows) == sum(result.states.values())
    assert sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows) == 12  # a FAIL trial does not use up n_trials
    assert list(rows[0])[:6] == ["number", "state", "value", "duration_s", "epochs_run", "reason"]
    assert {"train.lr", "train.momentum", "model.dropout"} <= set(rows[0])
    assert all(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in rows)
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert failed and all(r["reason"].startswith("diverged: train: loss diverged") for r in failed)
    assert all(float(r["train.lr"]) > 1.0 for r in failed)
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    assert pruned and all(int(r["epochs_run"]) < 3 and r["value"] for r in pruned)
    best = json.loads(result.best_params_path.read_text())
    assert best["params"] == result.best_params and best["value"] == result.best_value > 0.6
    assert (tmp_path / "history.html").stat().st_size > 10_000 and (tmp_path / "importance.html").exists()
    trials = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert max(len(t.user_attrs["pack"].split(",")) for t in trials) == 4  # they really trained together
    # Rerun: the study is continued and, its trials spent, runs none.
    again = run_tune(params, small_prepared_dir, tmp_path, data_version="abc.dir")
    assert again.study_name == result.study_name and len(list(csv.DictReader(open(again.trials_csv)))) == len(rows)


def test_packing_works_inside_each_worker(tmp_path, small_prepared_dir):
    import optuna

    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    overrides = {"model.arch": "seed_mlp", "train.scheduler": "none", "train.device": "cpu", "tune.limit_train": 500,
                 "tune.limit_val": 250, "tune.space": space,
                 "tune.n_trials": 4, "tune.epochs": 1, "tune.pruner": "none", "tune.packing": 2}
    result = run_tune(build_params({}, overrides), small_prepared_dir, tmp_path, data_version="abc.dir", workers=2)
    rows = list(csv.DictReader(open(result.trials_csv)))
    # Each worker counts the other's running trials against n_trials: no whole extra pack (a race may add one trial).
    assert sorted(int(r["number"]) for r in rows) == list(range(len(rows))) and 4 <= len(rows) <= 5
    assert all(r["state"] == "COMPLETE" for r in rows)
    trials = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert any(len(t.user_attrs.get("pack", "").split(",")) == 2 for t in trials)
