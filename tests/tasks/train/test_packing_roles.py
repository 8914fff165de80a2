"""Every train setting declares its packing role, and packed training honours it (tasks/train/packed.py).

per_model: a packed member with the value trains like run_train with it (its solo twin), and the value
changes training (so the comparison means something). shared: a different value starts another pack.
solo: a config that sets it trains alone instead of being packed and silently ignoring it.

A new TrainConfig field fails here until it declares a role, and a per_model one until PROBES shows
packing applies it.
"""

import json
import shutil
import logging

import numpy as np
import pytest
import torch
from pydantic import Field

from tests.prepared_edit import keep_records
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import DivergedError, run_train
from tuneline.tasks.train.packed import (PACKING_ROLES, Member, group_key, pack_capacity, packing_roles, solo_settings,
                                train_packed)

MLP = ModelConfig(arch="seed_mlp", dropout=0.0)
# Short runs (384 images, 6 steps an epoch) of a deterministic MLP: cheap, and float noise stays far below effects.
# fp32: a pack on a CPU trains in fp32 (tasks/train/packed.py), so its solo twin must too. No weight average in the
# base, so every other probe's effect is on the live weights; the ema probe turns it on.
BASE = TrainConfig(optimizer="adam", lr=2e-3, epochs=1, batch_size=64, scheduler="none", device="cpu",
                   deterministic=True, channels_last=False, seed=0, precision="fp32", ema=0.0)
FROZEN = {"lr": 1e-6}  # next to nothing learns: val accuracy stays flat, so plateau and early stopping act at once

# Every per_model field: (the context it acts in, its probe value).
PROBES = {
    "epochs": ({}, 2),
    "optimizer": ({"weight_decay": 0.5}, "adamw"),
    "lr": ({}, 1e-2),
    "momentum": ({"optimizer": "sgd", "lr": 0.05}, 0.5),
    "nesterov": ({"optimizer": "sgd", "lr": 0.05}, True),
    "beta1": ({}, 0.5),
    "beta2": ({}, 0.9),
    "eps": ({}, 1e-2),
    "weight_decay": ({}, 0.5),
    "l1": ({}, 1e-3),
    "label_smoothing": ({}, 0.3),
    "grad_clip": ({"optimizer": "sgd", "lr": 0.1}, 0.1),
    "ema": ({"epochs": 2}, 0.9),
    "scheduler": ({"epochs": 2}, "step"),
    "step_size": ({"epochs": 3, "scheduler": "step"}, 2),
    "gamma": ({"epochs": 2, "scheduler": "step"}, 0.1),
    "warmup_epochs": ({}, 0.5),
    "onecycle_pct_start": ({"epochs": 2, "scheduler": "onecycle"}, 0.7),
    "plateau_patience": ({**FROZEN, "epochs": 3, "scheduler": "plateau"}, 0),
    "plateau_factor": ({**FROZEN, "epochs": 3, "scheduler": "plateau", "plateau_patience": 0}, 0.1),
    "early_stopping_patience": ({**FROZEN, "epochs": 3}, 1),
    "early_stopping_metric": ({"epochs": 2, "early_stopping_min_delta": 0.1}, "val_loss"),
    "early_stopping_min_delta": ({"epochs": 3, "early_stopping_patience": 1}, 10.0),
    "divergence_factor": ({"optimizer": "sgd", "lr": 5.0}, 1e6),
    "restore_best": ({"epochs": 2, "early_stopping_min_delta": 10.0}, False),
    "seed": ({}, 3),
}


def per_model_fields() -> list[str]:
    return [name for name, role in packing_roles().items() if role == "per_model"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_prepared_dir):
    """The first 384 train / 250 val images of the session's slice."""
    dest = tmp_path_factory.mktemp("roles") / "prepared"
    shutil.copytree(small_prepared_dir, dest)
    for split, n in (("train", 384), ("val", 250)):
        keep_records(dest, split, slice(0, n))
    return dest


def test_every_train_setting_declares_its_packing_role():
    undeclared = {name: role for name, role in packing_roles().items() if role not in PACKING_ROLES}
    assert not undeclared, (f"TrainConfig fields without a packing role: {sorted(undeclared)}; add "
                            "json_schema_extra={'packing': 'per_model' | 'shared' | 'solo'} to each Field")
    missing = sorted(set(per_model_fields()) - set(PROBES))
    assert not missing, f"per_model fields without a probe in PROBES (show packing applies them): {missing}"


def alternative(name: str):
    """A valid value of TrainConfig.`name` other than BASE's."""
    default = getattr(BASE, name)
    if isinstance(default, bool):
        candidates = [not default]
    elif default is None:  # an optional number: off by default
        candidates = [1000, 0.5]
    elif isinstance(default, str):  # a Literal: its other choices
        candidates = list(TrainConfig.model_fields[name].annotation.__args__)
    else:
        candidates = [default + 1, default * 2, 0.1, 0.5]
    for value in candidates:
        if value != default:
            try:
                return getattr(TrainConfig(**{name: value}), name)
            except ValueError:
                continue
    raise AssertionError(f"no alternative value found for train.{name}")


@pytest.mark.parametrize("name", [n for n, role in packing_roles().items() if role == "shared"])
def test_a_shared_setting_splits_packs(name):
    other = BASE.model_copy(update={name: alternative(name)})
    assert group_key(MLP, other) != group_key(MLP, BASE)
    assert solo_settings(other) == []


class _WithSolo(TrainConfig):
    lookahead: float = Field(0.0, ge=0.0, description="a knob packing does not implement",
                       json_schema_extra={"packing": "solo"})


class _Undeclared(TrainConfig):
    lookahead: float = Field(0.0, description="a knob that forgot its role")


def test_a_solo_setting_trains_alone_instead_of_being_ignored(tiny, caplog):
    default, set_ = _WithSolo(**BASE.model_dump()), _WithSolo(**BASE.model_dump(), lookahead=0.9)
    assert solo_settings(default) == [] and solo_settings(set_) == ["lookahead"]
    assert group_key(MLP, default) != group_key(MLP, set_)
    assert pack_capacity(MLP, default, tiny, requested=4) == 4
    with caplog.at_level(logging.INFO, logger="tuneline.tasks.train.packed"):
        assert pack_capacity(MLP, set_, tiny, requested=4) == 1  # the tuner trains a pack of one with run_train
    assert "train.lookahead=0.9 trains alone: packed training does not implement it" in caplog.text
    with pytest.raises(ValueError, match=r"train.lookahead=0.9 runs solo .* train this config with run_train"):
        train_packed([Member(MLP, default), Member(MLP, set_)], tiny)


def test_a_setting_without_a_role_cannot_be_packed():
    with pytest.raises(TypeError, match=r"TrainConfig.lookahead declares no packing role"):
        group_key(MLP, _Undeclared(**BASE.model_dump()))


def outcome(run) -> dict:
    """What a run trained: its status, lr and epoch count per epoch, final weights."""
    try:
        status, history, state = run()
    except DivergedError:
        return {"status": "diverged", "lrs": [], "state": None}
    return {"status": status, "lrs": [h["lr"] for h in history], "state": state}


_SOLO: dict[str, dict] = {}


def solo(tiny, tmp_path, cfg: TrainConfig) -> dict:
    """run_train's outcome for `cfg` (each config trained once per session)."""
    key = cfg.model_dump_json()
    if key not in _SOLO:
        _SOLO[key] = _train_solo(tiny, tmp_path, cfg)
    return _SOLO[key]


def _train_solo(tiny, tmp_path, cfg: TrainConfig) -> dict:
    def run():
        result = run_train(MLP, cfg, tiny, tmp_path / "m.pt", tmp_path / "h.csv", Lineage("t", "t", "t"),
                           checkpoint_dir=tmp_path / "ckpt", show_progress=False)
        return "complete", result.history, torch.load(tmp_path / "m.pt", weights_only=False)["state_dict"]

    return outcome(run)


def gap(a: dict | None, b: dict | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def probe_config(name: str) -> TrainConfig:
    return BASE.model_copy(update={**PROBES[name][0], name: PROBES[name][1]})


def probe_packs() -> dict[str, list[str]]:
    """The probed fields grouped into packs: one per group_key and data seed (a member's seed is the data seed)."""
    packs: dict[tuple, list[str]] = {}
    for name in per_model_fields():
        if name in PROBES:
            cfg = probe_config(name)
            packs.setdefault((cfg.optimizer.replace("adamw", "adam"), cfg.seed, group_key(MLP, cfg)), []).append(name)
    return {f"{family}-seed{seed}": names for (family, seed, _), names in packs.items()}


@pytest.mark.parametrize("pack", list(probe_packs()))
def test_each_per_model_setting_is_applied_by_packing(pack, tiny, tmp_path):
    # One pack holds the probes of one optimizer family and seed (each member with its own knob away from its
    # context's value); each member must train as run_train does with the same config, and that config must train
    # differently from its context: a per_model knob that packing ignored would match the context, not the twin.
    names = probe_packs()[pack]
    configs = {n: probe_config(n) for n in names}
    packed = dict(zip(names, train_packed([Member(MLP, c) for c in configs.values()], tiny,
                                          data_seed=configs[names[0]].seed, keep_states=True)))
    for name in names:
        context = BASE.model_copy(update=PROBES[name][0])
        theirs, before = solo(tiny, tmp_path, configs[name]), solo(tiny, tmp_path, context)
        r = packed[name]
        mine = {"status": r.status, "lrs": [h["lr"] for h in r.history], "state": r.state}
        effect = gap(theirs["state"], before["state"])
        assert (theirs["status"], theirs["lrs"]) != (before["status"], before["lrs"]) or effect > 1e-4, \
            f"train.{name}={PROBES[name][1]!r}: the probe does not change solo training; pick a probe that does"
        assert (mine["status"], mine["lrs"]) == (theirs["status"], theirs["lrs"]), f"train.{name}: packed != solo"
        assert gap(mine["state"], theirs["state"]) <= max(0.02 * effect, 1e-4), \
            f"train.{name}: packed weights {gap(mine['state'], theirs['state']):.3g} from solo (effect {effect:.3g})"
