"""train.augment_flip (one path, solo and packed), model.kwargs in tune.space, and models that cannot be packed."""

import csv
import logging
import sys
import textwrap

import pytest
import torch

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.params import build_params
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.augment import flip_batch
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import run_train
from tuneline.tasks.train.packed import Member, train_packed
from tuneline.tasks.tune.space import validate_space
from tuneline.tasks.tune.stage import run_tune
from tests.tasks.model.synthetic import write_prepared

LINEAGE = Lineage("abc123.dir", "p" * 16, "c" * 40)

UNPACKABLE = '''
from torch import nn


class Gated(nn.Module):
    """Branches on the data: fine alone, impossible under vmap (a pack stacks K models with vmap)."""

    def __init__(self, n_classes, in_channels, image_size):
        super().__init__()
        self.linear = nn.Linear(in_channels * image_size[0] * image_size[1], n_classes)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if logits.mean() > 100:  # data-dependent control flow on the model's own (stacked) output
            logits = logits * 0.5
        return logits


def build(n_classes, in_channels, image_size, dropout):
    return Gated(n_classes, in_channels, image_size)
'''


@pytest.mark.fast
def test_flip_mirrors_about_half_the_images_reproducibly():
    images = torch.arange(64 * 2 * 3 * 5, dtype=torch.float32).view(64, 2, 3, 5)
    out = flip_batch(images, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped ^ kept).all()) and 20 < int(flipped.sum()) < 44  # each image whole: mirrored or not
    assert torch.equal(out, flip_batch(images, torch.Generator().manual_seed(0)))


def test_flip_trains_the_same_solo_and_packed(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu", scheduler="none", optimizer="sgd", lr=0.05,
                      augment_flip=True, restore_best=False, precision="fp32")  # a pack on a CPU trains in fp32
    model_cfg = ModelConfig(arch="seed_mlp", dropout=0.0)
    solo = run_train(model_cfg, cfg, prepared, tmp_path / "m.pt", tmp_path / "h.csv", LINEAGE)
    plain = run_train(model_cfg, cfg.model_copy(update={"augment_flip": False}), prepared, tmp_path / "p.pt",
                      tmp_path / "p.csv", LINEAGE)
    assert solo.history[-1]["train_loss"] != plain.history[-1]["train_loss"]  # the flips happened
    # Packed with a second member: the first (same seed, the data seed) trains exactly like the solo run.
    packed = train_packed([Member(model_cfg, cfg), Member(model_cfg, cfg.model_copy(update={"lr": 0.01}))],
                          prepared)[0]
    assert [h["train_loss"] for h in packed.history] == pytest.approx([h["train_loss"] for h in solo.history],
                                                                      rel=1e-4)


@pytest.mark.fast
def test_model_kwargs_are_tunable():
    params = build_params({}, {"model.arch": "fast_cnn", "tune.space": {
        "model.kwargs.width": {"type": "categorical", "choices": [4, 8]}}})
    validate_space(params, params.tune.space)
    assert build_params(params.model_dump(mode="json"), {"model.kwargs.width": 8}).model.kwargs == {"width": 8}


@pytest.fixture
def unpackable_arch(tmp_path, monkeypatch):
    name = f"gated_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(UNPACKABLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{name}:build"
    sys.modules.pop(name, None)


def test_a_model_that_cannot_be_packed_trains_solo_with_the_reason_logged(tmp_path, unpackable_arch, caplog):
    prepared = write_prepared(tmp_path / "prepared")
    params = build_params({}, {
        "model.arch": unpackable_arch, "model.dropout": 0.0, "train.device": "cpu", "train.scheduler": "none",
        "train.batch_size": 32, "tune.epochs": 1, "tune.n_trials": 2, "tune.pruner": "none", "tune.packing": 2,
        "tune.space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}})
    with caplog.at_level(logging.INFO):
        result = run_tune(params, prepared, tmp_path / "tuning", data_version="abc.dir")
    rows = list(csv.DictReader(open(result.trials_csv)))
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows)
    assert f"tune.packing: {unpackable_arch} trains solo, one trial at a time: a probe pack of 2 failed" in caplog.text
