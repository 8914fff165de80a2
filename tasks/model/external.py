"""Networks from outside Tuneline: torchvision classifiers by name and a user's own factory function.

`model.arch` names one of three kinds (`arch_kind`):

    seed_cnn | seed_mlp | bn_cnn | fast_cnn   built in (tasks/model/architectures.py, fastnet.py)
    torchvision:NAME                          any classification constructor of torchvision.models
                                              (`torchvision.models.list_models(torchvision.models)`), e.g.
                                              torchvision:resnet18; built with num_classes=<classes> and
                                              **model.kwargs, never with weights= (nothing is downloaded);
                                              the first convolution is replaced when the data's channel count
                                              differs from the one it expects
    module:function                           a user's factory, e.g. mypkg.nets:build (see below)

A user factory is called as

    build(n_classes=int, in_channels=int, image_size=(height, width), dropout=float, **model.kwargs) -> nn.Module

and returns a module that maps *normalised* float pixels [N, C, H, W] to logits [N, n_classes]: Tuneline's
Classifier wraps it, so the checkpoint, the ONNX graph and the server still take raw 0..255 pixels. The
module is imported from the installed packages first, then from the project folder (the current directory,
appended to sys.path so a user's folders never shadow installed packages). Its source file is a DVC
dependency of the stages that build the model (`user_model_module`), so editing it retrains.

`model.weights: PATH` (`load_initial_weights`) starts training from a local state dict: tensors whose names
and shapes match are copied, the rest (an adapted stem, a head for another class count) keep their fresh
initialisation, and the skipped keys are logged. `model.freeze_backbone` (`freeze_backbone`) trains only the
head (and a replaced stem, which starts from random).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from tuneline.core.config.model import TORCHVISION_PREFIX, check_arch_name

log = logging.getLogger(__name__)



class ModelBuildError(ValueError):
    """The model named by model.arch cannot be built (not importable, wrong signature, wrong output)."""


def arch_kind(arch: str) -> str:
    """'builtin' | 'torchvision' | 'factory' for a valid model.arch; ValueError (one line) otherwise.

    The form is the config's check (core/config/model.py: check_arch_name); what only the model package can know,
    whether torchvision has the named model, is checked here."""
    kind = check_arch_name(arch)
    if kind == "torchvision":
        name = arch[len(TORCHVISION_PREFIX):]
        available = torchvision_models()
        if name not in available:
            close = [m for m in available if m.startswith(name[:4])][:6] if name else []
            raise ValueError(f"unknown torchvision model {name!r}: name a classification model of torchvision.models"
                             + (f" (e.g. {', '.join(close)})" if close else ", e.g. torchvision:resnet18"))
    return kind


def torchvision_models() -> list[str]:
    """The classification model constructors torchvision offers (not detection, segmentation, video)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def user_model_module(arch: str) -> str | None:
    """The module a `module:function` arch imports (e.g. 'mypkg.nets'), or None for built-in and torchvision ones.

    The pipeline makes that module's source file a DVC dependency of the stages that build the model
    (flows/code_deps.py: stage_code_files(stage, user_modules=...)).
    """
    try:
        kind = check_arch_name(arch)
    except ValueError:
        return None
    return arch.split(":", 1)[0] if kind == "factory" else None


def import_factory(arch: str, project_dir: Path | None = None):
    """The function `module:function` names; a ModelBuildError (one line) when it cannot be imported."""
    module_name, function_name = arch.split(":", 1)
    try:
        module = _import(module_name, Path(project_dir) if project_dir else Path.cwd())
    except ImportError as exc:
        raise ModelBuildError(f"model.arch: cannot import {module_name!r} for {arch!r} ({exc}): run from the project "
                              f"folder that holds {module_name.replace('.', '/')}.py, or put it on PYTHONPATH") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelBuildError(f"model.arch: {module_name} ({getattr(module, '__file__', '?')}) has no function "
                              f"{function_name!r}: define `def {function_name}(n_classes, in_channels, image_size, "
                              "dropout, **kwargs) -> nn.Module` there")
    return function


def _import(module_name: str, project_dir: Path):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing_top = exc.name is not None and module_name.split(".")[0] == exc.name.split(".")[0]
        folder = str(project_dir.resolve())
        if not missing_top or folder in sys.path:
            raise
    sys.path.append(folder)  # appended: a user's folder never shadows an installed package of the same name
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def build_factory(arch: str, n_classes: int, dropout: float, image_shape: tuple[int, int, int],
                  kwargs: dict) -> nn.Module:
    """Call the user's factory with the data's shape and model.kwargs; check what it returns."""
    function = import_factory(arch)
    channels, height, width = image_shape
    try:
        net = function(n_classes=n_classes, in_channels=channels, image_size=(height, width), dropout=dropout,
                       **kwargs)
    except TypeError as exc:
        raise ModelBuildError(f"model.arch: {arch}{inspect.signature(function)} cannot take n_classes, in_channels, "
                              f"image_size, dropout{''.join(', ' + k for k in kwargs)} ({exc}): see docs/models.md") from None
    if not isinstance(net, nn.Module):
        raise ModelBuildError(f"model.arch: {arch} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def build_torchvision(arch: str, n_classes: int, image_shape: tuple[int, int, int], kwargs: dict) -> nn.Module:
    """torchvision.models.<name>(num_classes=n_classes, **kwargs) with the stem adapted to the data's channels."""
    import torchvision

    name = arch[len(TORCHVISION_PREFIX):]
    if "weights" in kwargs:  # torchvision would download them: weights come from model.weights, a local file
        raise ModelBuildError("model.kwargs.weights: torchvision weights are never downloaded: save a state dict "
                              "locally and set model.weights: PATH instead")
    net = torchvision.models.get_model(name, weights=None, num_classes=n_classes, **kwargs)
    stem_name, stem = first_conv(net)
    if stem is not None and stem.in_channels != image_shape[0]:
        _set_module(net, stem_name, _conv_like(stem, image_shape[0]))
        net.tuneline_stem_replaced = True  # freeze_backbone keeps a fresh stem trainable
    return net


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d | None]:
    """The first Conv2d in module order (the stem that sees the pixels)."""
    return next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), ("", None))


def head_modules(net: nn.Module, n_classes: int) -> list[str]:
    """The classifier head: the last layer producing the class logits (Linear, or Conv2d for squeezenet)."""
    last = [n for n, m in net.named_modules()
            if (isinstance(m, nn.Linear) and m.out_features == n_classes)
            or (isinstance(m, nn.Conv2d) and m.out_channels == n_classes)]
    return last[-1:]


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=1 if conv.groups == conv.in_channels else conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def load_initial_weights(model: nn.Module, path: Path, prefix: str = "net.") -> tuple[list[str], list[str]]:
    """Copy the tensors of the state dict at `path` whose names and shapes match into `model.<prefix>...`.

    The file may hold the network's own state dict (torchvision's `resnet18().state_dict()`), a Tuneline
    checkpoint, or a dict with a "state_dict"; names are tried as given and under `prefix` (Classifier.net).
    Returns (loaded keys, skipped keys); the skipped ones are logged with why.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: {path}: no such file: save a state dict there "
                                "(torch.save(model.state_dict(), PATH)) or unset model.weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise ModelBuildError(f"model.weights: {path}: not a readable state dict ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelBuildError(f"model.weights: {path}: holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    loaded, skipped, update = [], [], {}
    for key, tensor in state.items():
        target = key if key in own else prefix + key if prefix + key in own else None
        if target is None:
            skipped.append(f"{key} (no such tensor in {type(model).__name__})")
        elif not isinstance(tensor, torch.Tensor) or tensor.shape != own[target].shape:
            skipped.append(f"{key} (shape {tuple(getattr(tensor, 'shape', ()))} vs {tuple(own[target].shape)})")
        else:
            update[target] = tensor
            loaded.append(key)
    if not update:
        raise ModelBuildError(f"model.weights: {path}: none of its {len(state)} tensors matches the model's names "
                              f"and shapes (e.g. {next(iter(state), '?')!r}): is it a state dict of model.arch?")
    model.load_state_dict(update, strict=False)
    fresh = [k for k in own if k not in update and not k.startswith(("scale", "shift"))]
    log.info("model.weights: %s: loaded %d tensors; skipped %d: %s; initialised afresh: %s", path, len(loaded),
             len(skipped), ", ".join(skipped) or "none", ", ".join(fresh) or "none")
    return loaded, skipped


def freeze_backbone(model: nn.Module, n_classes: int, prefix: str = "net.") -> list[str]:
    """Stop gradients to everything but the head (and a replaced stem); batch norms of the backbone stay in eval mode.

    Returns the names of the parameters left trainable. A frozen batch norm keeps its running statistics:
    `Classifier.train()` puts the frozen norms back in eval mode (see `frozen_norms`).
    """
    net = model.get_submodule(prefix.rstrip(".")) if prefix else model
    trainable = set(head_modules(net, n_classes))
    stem_name, stem = first_conv(net)
    if stem is not None and getattr(net, "tuneline_stem_replaced", False):
        trainable.add(stem_name)
    if not trainable - {stem_name}:
        raise ModelBuildError("model.freeze_backbone: found no head layer with the class count as its output size "
                              "to keep training; unset model.freeze_backbone for this network")
    kept = []
    for name, param in net.named_parameters():
        train = any(name == t or name.startswith(t + ".") for t in trainable)
        param.requires_grad_(train)
        if train:
            kept.append(prefix + name)
    model.frozen_norms = [m for n, m in net.named_modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                              n == t or n.startswith(t + ".") for t in trainable)]
    return kept
