"""A user's own loader: `data.source: mypkg.data:load`, for data that is not a folder of images.

The contract (docs/data.md) is checked in full here, so a wrong return is one clear line, not a shape error
three stages later.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tuneline.tasks.data.idx import DataError

SPLITS = ("train", "val", "test")


def import_loader(source: str, project_dir: Path):
    """The function `module:function` names, imported with the project folder first on sys.path."""
    module_name, _, function_name = source.partition(":")
    added = str(Path(project_dir).resolve())
    sys.path.insert(0, added)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"data.source: cannot import {module_name!r} ({exc}): put the module in the project folder "
                        f"({added}) or install it") from None
    finally:
        sys.path.remove(added)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataError(f"data.source: {module_name} ({module.__file__}) has no function {function_name!r}: "
                        "name a function that returns the data (docs/data.md)")
    return function


def _check_split(source: str, split: str, value: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    where = f"data.source: {source} returned {split}"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DataError(f"{where} as {type(value).__name__}: expected a pair (images, labels)")
    images, labels = value
    if not isinstance(images, np.ndarray):
        raise DataError(f"{where} images as {type(images).__module__}.{type(images).__name__}: "
                        "expected a numpy array (e.g. tensor.numpy())")
    if images.dtype != np.uint8:
        raise DataError(f"{where} images of dtype {images.dtype}: expected uint8 pixels 0..255 "
                        "(e.g. (x * 255).round().astype(np.uint8))")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"{where} images of shape {list(images.shape)}: expected [N, H, W] (gray) or "
                        "[N, H, W, C] with C = 1 or 3 (channels last)")
    if images.shape[0] == 0 or min(images.shape[1:3]) == 0:
        raise DataError(f"{where} images of shape {list(images.shape)}: the split is empty")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where} labels of shape {list(labels.shape)} and dtype {labels.dtype}: expected a 1-D "
                        "integer array")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels: they must pair up")
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{where} label {int(labels[i])} at index {i}: out of range 0..{n_classes - 1} "
                        f"(len(classes) = {n_classes})")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]  # one channel is gray: stored [N, H, W] like MNIST
    return np.ascontiguousarray(images), labels.astype(np.int64)


def check_loaded(source: str, data: Any) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Validate a loader's return value against the contract; (class names, {split: (images, labels)})."""
    if not isinstance(data, Mapping):
        raise DataError(f"data.source: {source} returned {type(data).__name__}: expected a mapping with 'classes', "
                        "'train' and optionally 'val' and 'test'")
    unknown = sorted(set(data) - {"classes", *SPLITS})
    if unknown:
        raise DataError(f"data.source: {source} returned unknown key(s) {unknown}: expected 'classes', 'train', "
                        "'val', 'test'")
    for key in ("classes", "train"):
        if key not in data:
            raise DataError(f"data.source: {source} returned no {key!r}: it is required (docs/data.md)")
    classes = data["classes"]
    if (not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise DataError(f"data.source: {source} returned classes={classes!r}: expected a list of distinct, "
                        "non-empty class names (str)")
    if len(classes) < 2:
        raise DataError(f"data.source: {source} returned {len(classes)} class(es): a classifier needs at least 2")
    sets = {split: _check_split(source, split, data[split], len(classes)) for split in SPLITS if split in data}
    shapes = {split: images.shape[1:] for split, (images, _) in sets.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"data.source: {source} returned images of different shapes per split "
                        f"({ {s: list(v) for s, v in shapes.items()} }): every split must share one [H, W(, C)]")
    return list(classes), sets


def run_loader(source: str, options: dict[str, Any], project_dir: Path
               ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Call the user's loader with `data.options` as keyword arguments and check what it returns.

    The contract: `function(**data.options)` returns a mapping
        {"classes": list[str],                          # class names; label k is classes[k]
         "train": (images, labels),                     # required
         "val": (images, labels), "test": (...)}        # optional: carved from train when absent
    where images are uint8 numpy arrays [N, H, W] (gray) or [N, H, W, C] with C = 1 or 3 (channels last),
    the same H, W, C in every split, and labels are 1-D integer arrays of N values in [0, len(classes)).
    """
    function = import_loader(source, project_dir)
    try:
        inspect.signature(function).bind(**options)
    except TypeError as exc:
        raise DataError(f"data.options: {source} does not take {sorted(options)} ({exc}): "
                        "match data.options to the function's parameters") from None
    except ValueError:
        pass  # no signature to check (a builtin): let the call say
    return check_loaded(source, function(**options))
