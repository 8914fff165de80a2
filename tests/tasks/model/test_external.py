"""Networks from outside Tuneline: torchvision by name, local weights, a frozen backbone, a user's own factory."""

import logging
import sys
import textwrap

import pytest
import torch

from tuneline.core.config.base import ConfigError
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.params import build_params
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.model.architectures import ModelArgs, build_model, user_model_module
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.tasks.model.external import ModelBuildError, freeze_backbone, load_initial_weights
from tuneline.tasks.ship.export import export_onnx_file, check_parity
from tuneline.tasks.train.loop import run_train
from tests.tasks.model.synthetic import write_prepared

LINEAGE = Lineage("abc123.dir", "p" * 16, "c" * 40)
FAST_TRAIN = dict(epochs=1, batch_size=32, device="cpu", scheduler="none", optimizer="adamw", lr=1e-3)

FACTORY = '''
from torch import nn


def build(n_classes, in_channels, image_size, dropout, hidden=8):
    h, w = image_size
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(hidden * h * w, n_classes))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A package `usernets_<id>` with nets.py:build in a project folder (the cwd), not yet on sys.path."""
    name = f"usernets_{tmp_path.name.replace('-', '_')}"
    package = tmp_path / "project" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import appends the project folder: undone after
    yield f"{name}.nets:build"
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def rgb_args(arch: str, classes: int = 4, side: int = 32, **kwargs) -> ModelArgs:
    return ModelArgs(arch=arch, dropout=0.0, n_classes=classes, image_shape=(3, side, side), mean=(0.5, 0.5, 0.5),
                     std=(0.25, 0.25, 0.25), kwargs=kwargs)


def train_steps(model, steps: int = 2, side: int = 32) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(steps):
        x, y = torch.rand(8, 3, side, side) * 255, torch.arange(8) % 4
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("arch, kwargs", [("fast_cnn", {"width": 8}), ("torchvision:resnet18", {})])
def test_trains_a_few_steps_and_exports_with_parity(arch, kwargs, tmp_path):
    torch.manual_seed(0)
    model = build_model(rgb_args(arch, **kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("weight"))
    model.eval()
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    export_onnx_file(model, images[:2].float(), tmp_path / "m.onnx", opset=18)
    assert max(check_parity(model, tmp_path / "m.onnx", images, atol=1e-3).values()) < 1e-3


def test_torchvision_stem_follows_the_channels():
    model = build_model(ModelArgs("torchvision:resnet18", 0.0, 3, (1, 16, 16), 0.5, 0.25))
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 3
    assert model(torch.rand(2, 1, 16, 16) * 255).shape == (2, 3)


def test_weights_keep_matching_tensors_and_log_the_skipped(tmp_path, caplog):
    import torchvision

    torch.manual_seed(1)
    donor = torchvision.models.resnet18(num_classes=1000)  # an "ImageNet" head: 1000 classes
    donor.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # and a gray stem: both must be skipped
    torch.save(donor.state_dict(), tmp_path / "r18.pt")
    torch.manual_seed(2)
    model = build_model(rgb_args("torchvision:resnet18"))
    fresh_head = model.net.fc.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="tuneline.tasks.model.external"):
        loaded, skipped = load_initial_weights(model, tmp_path / "r18.pt")
    assert torch.equal(model.net.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    assert torch.equal(model.net.bn1.running_mean, donor.bn1.running_mean)
    assert torch.equal(model.net.fc.weight, fresh_head)  # the head stays as initialised
    assert sorted(k.split(" ")[0] for k in skipped) == ["conv1.weight", "fc.bias", "fc.weight"]
    assert "layer1.0.conv1.weight" in loaded
    assert "skipped 3: conv1.weight (shape (64, 1, 7, 7) vs (64, 3, 7, 7))" in caplog.text


def test_weights_that_match_nothing_are_a_clear_error(tmp_path):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(ModelBuildError, match=r"model.weights: .*w.pt: none of its 1 tensors matches"):
        load_initial_weights(build_model(rgb_args("fast_cnn", width=4)), tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="model.weights: .*missing.pt: no such file"):
        load_initial_weights(build_model(rgb_args("fast_cnn", width=4)), tmp_path / "missing.pt")


def test_freeze_backbone_trains_only_the_head():
    torch.manual_seed(0)
    model = build_model(rgb_args("torchvision:resnet18"))
    trainable = freeze_backbone(model, 4)
    assert trainable == ["net.fc.weight", "net.fc.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, steps=1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"net.fc.weight", "net.fc.bias"}  # backbone weights and batch-norm statistics untouched


def test_user_factory_builds_trains_checkpoints_and_reloads(user_module, tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    model_cfg = ModelConfig(arch=user_module, dropout=0.1, kwargs={"hidden": 6})
    result = run_train(model_cfg, TrainConfig(**{**FAST_TRAIN, "epochs": 3, "lr": 3e-3}), prepared, tmp_path / "m.pt",
                       tmp_path / "h.csv", LINEAGE)
    assert result.best_val_accuracy > 0.5  # 4 classes: it learns
    model, checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert checkpoint["model_args"]["arch"] == user_module and checkpoint["model_args"]["kwargs"] == {"hidden": 6}
    assert model.net[0].out_channels == 6
    assert user_model_module(user_module) == user_module.split(":")[0]


def test_user_factory_that_cannot_be_imported_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelBuildError, match=r"^model.arch: cannot import 'nosuchpkg.nets' .*run from the project "
                                              r"folder that holds nosuchpkg/nets.py"):
        build_model(rgb_args("nosuchpkg.nets:build"))


def test_user_factory_with_a_wrong_signature_says_so(user_module):
    with pytest.raises(ModelBuildError, match=r"cannot take n_classes, in_channels, image_size, dropout, depth"):
        build_model(rgb_args(user_module, depth=3))


@pytest.mark.fast
@pytest.mark.parametrize("arch, message", [
    ("resnet", r"model.arch: .*unknown architecture 'resnet': use a built-in .*torchvision:NAME .*module:function"),
    ("my pkg:build", r"unknown architecture 'my pkg:build'"),
    ("torchvision:", r"unknown architecture 'torchvision:'"),
])
def test_arch_is_validated_by_its_form_at_config_time(arch, message):
    with pytest.raises(ConfigError, match=message):
        build_params({}, {"model.arch": arch})


@pytest.mark.fast
def test_an_unknown_torchvision_model_is_reported_by_the_stage_that_builds_it():
    """The config checks names without importing model code (the server validates params with no PyTorch); the
    model package, which knows torchvision's list, says which names exist."""
    assert build_params({}, {"model.arch": "torchvision:resnet1000"}).model.arch == "torchvision:resnet1000"
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet1000'.*e.g. resnet1"):
        build_model(rgb_args("torchvision:resnet1000"))


@pytest.mark.fast
def test_the_config_knows_exactly_the_built_in_architectures():
    from tuneline.core.config.model import BUILTIN_ARCHITECTURES
    from tuneline.tasks.model.architectures import ARCHITECTURES

    from tuneline.tasks.model.audio import AUDIO_ARCHITECTURES
    from tuneline.tasks.model.text import TEXT_ARCHITECTURES

    assert (*ARCHITECTURES, *AUDIO_ARCHITECTURES, *TEXT_ARCHITECTURES) == BUILTIN_ARCHITECTURES


@pytest.mark.fast
def test_arch_forms_that_are_accepted():
    for arch in ("fast_cnn", "torchvision:resnet18", "mypkg.nets:build"):
        assert build_params({}, {"model.arch": arch}).model.arch == arch
    assert user_model_module("torchvision:resnet18") is None and user_model_module("bn_cnn") is None


@pytest.mark.fast
def test_model_kwargs_keys_are_overrides():
    params = build_params({"model": {"arch": "fast_cnn", "kwargs": {"width": 8}}}, {"model.kwargs.depth": 2})
    assert params.model.kwargs == {"width": 8, "depth": 2}
