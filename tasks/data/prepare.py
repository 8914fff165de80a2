"""Stage `prepare`: raw IDX files -> stratified train/val/test uint8 tensors + a manifest describing them.

The official MNIST test set is kept apart; validation is carved out of the training set with a seeded,
per-class shuffle, so the same seed always gives the same split. Tensors stay uint8 (a quarter of the
float32 size); normalisation statistics are computed on the training split and recorded in the manifest
so that training, export and serving all use the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneline.core.atomic import staged_dir
from tuneline.core.config.data import DataConfig
from tuneline.core.spec import InputSpec
from tuneline.tasks.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, check_pair, read_idx

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TEST_FRACTION_WITHOUT_TEST_SET = 1 / 7  # image folders have no official test set; MNIST's ratio is 10k/70k


@dataclass(frozen=True)
class PrepareResult:
    prepared_dir: Path
    counts: dict[str, int]
    manifest: dict


def stratified_take(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (`count` taken, rest) with each class in proportion, deterministically from `seed`."""
    rng = np.random.default_rng(seed)
    classes, class_sizes = np.unique(labels, return_counts=True)
    # Largest-remainder allocation so the per-class counts add up to exactly `count`.
    exact = class_sizes * (count / labels.size)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: count - int(quota.sum())]:
        quota[i] += 1
    taken, rest = [], []
    for cls, k in zip(classes, quota):
        members = rng.permutation(np.flatnonzero(labels == cls))
        taken.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


# split -> file-name stems fetch may have written it under (tasks/data/fetch.py): MNIST's train / t10k, the
# split folders of an image folder or a loader's splits, or `all` (no splits: test and val are carved here).
RAW_STEMS = {"train": ("train",), "val": ("val",), "test": ("t10k", "test"), "all": ("",)}


def _read_raw_set(raw_dir: Path, stem: str, n_classes: int) -> tuple[np.ndarray, np.ndarray] | None:
    prefix = f"{stem}-" if stem else ""
    for ndim in (3, 4):  # gray [N, H, W] or colour [N, H, W, C]
        images_path = raw_dir / f"{prefix}images-idx{ndim}-ubyte"
        if images_path.is_file():
            labels_path = raw_dir / f"{prefix}labels-idx1-ubyte"
            images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
            check_pair(images, labels, images_path, labels_path, n_classes=n_classes)
            return images, labels
    return None


def _load_raw(raw_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], str]:
    classes_path = raw_dir / "classes.json"
    if not classes_path.is_file():
        raise DataError(f"{classes_path}: missing: run `tuneline stage fetch` (or `dvc repro`) first")
    classes = json.loads(classes_path.read_text())
    sets = {}
    for split, stems in RAW_STEMS.items():
        for stem in stems:
            found = _read_raw_set(raw_dir, stem, len(classes))
            if found is not None:
                sets[split] = found
                break
    source_path = raw_dir / "source.json"
    # MNIST's raw folder is exactly the four files and classes.json (its bytes are the data version).
    source = json.loads(source_path.read_text())["source"] if source_path.is_file() else "mnist"
    if "all" in sets and "train" not in sets:  # no splits in the source: all of it is train, test carved below
        sets["train"] = sets.pop("all")
    if "train" not in sets or "all" in sets:
        raise DataError(f"{raw_dir}: expected MNIST's four IDX files or an image-folder conversion; "
                        "run `tuneline stage fetch` again")
    if "test" not in sets:  # carve the test set out first, with its own seed stream: it depends only on the data
        images, labels = sets["train"]
        test_idx, train_idx = stratified_take(labels, round(labels.size * TEST_FRACTION_WITHOUT_TEST_SET), seed=1)
        sets["train"], sets["test"] = (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])
        log.info("prepare: the source has no test split: %d images (1/7, stratified) carved from train",
                 test_idx.size)
    shapes = {split: images.shape[1:] for split, (images, _) in sets.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{raw_dir}: splits differ in image shape ({ {k: list(v) for k, v in shapes.items()} }): "
                        "run `tuneline stage fetch` again")
    return sets, classes, source


def to_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] (gray) or [N, H, W, C] (as images are decoded) -> [N, C, H, W], the one stored layout."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(f"prepare: images of shape {list(images.shape)}: expected [N, H, W] or [N, H, W, C]")


def measure_spec(train_images: np.ndarray, classes: list[str]) -> InputSpec:
    """The input spec of NCHW uint8 training images: shape, classes and per-channel mean/std of pixels / 255."""
    _, channels, height, width = train_images.shape
    means, stds = [], []
    for c in range(channels):
        # Exact integer moments per channel (no float copy of the whole split: CIFAR-10's would be 1.1 GB).
        values = train_images[:, c]
        count = values.size
        total = int(values.sum(dtype=np.int64))
        squares = int(np.einsum("nhw,nhw->", values, values, dtype=np.int64))
        mean = total / count / 255.0
        var = max(squares / count / 255.0**2 - mean**2, 0.0)
        means.append(round(mean, 6))
        stds.append(max(round(var**0.5, 6), 1e-6))  # a constant channel must not divide by zero
    return InputSpec(channels=channels, height=height, width=width, class_names=tuple(classes),
                     mean=tuple(means), std=tuple(stds))


def _limit(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= labels.size:
        return images, labels
    keep, _ = stratified_take(labels, limit, seed)
    return images[keep], labels[keep]


def run_prepare(cfg: DataConfig, raw_dir: Path, prepared_dir: Path) -> PrepareResult:
    """Validate `raw_dir`, split it and write `prepared_dir` atomically (temp dir, then rename)."""
    raw_dir, prepared_dir = Path(raw_dir), Path(prepared_dir)
    sets, classes, source = _load_raw(raw_dir)
    train_images, train_labels = _limit(*sets["train"], cfg.limit_train, cfg.seed)
    test_images, test_labels = _limit(*sets["test"], cfg.limit_test, cfg.seed)
    if "val" in sets:  # the source's own validation split is kept whole
        splits = {"train": (train_images, train_labels), "val": sets["val"]}
    else:
        val_idx, train_idx = stratified_take(train_labels, max(len(classes), round(train_labels.size * cfg.val_fraction)), cfg.seed)
        splits = {"train": (train_images[train_idx], train_labels[train_idx]),
                  "val": (train_images[val_idx], train_labels[val_idx])}
    splits["test"] = (test_images, test_labels)
    splits = {name: (to_nchw(images), labels) for name, (images, labels) in splits.items()}
    spec = measure_spec(splits["train"][0], classes)
    manifest = {
        # No absolute paths in here: the output (and so its DVC hash) must not depend on where the project lives.
        "source": source,
        "classes": classes,
        "input_spec": spec.to_dict(),
        "image_shape": list(spec.shape),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "limits": {"train": cfg.limit_train, "test": cfg.limit_test},
        "raw_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(raw_dir.iterdir()) if p.is_file()},
        "counts": {},
        "counts_per_class": {},
        "files": {},
    }
    with staged_dir(prepared_dir) as staging:
        for split in SPLITS:
            images, labels = splits[split]
            # .npy, not torch.save: byte-identical for identical data (torch.save embeds a random id),
            # so DVC sees an unchanged output when nothing changed.
            for path, array in ((staging / f"{split}-images.npy", images), (staging / f"{split}-labels.npy", labels.astype(np.int64))):
                np.save(path, np.ascontiguousarray(array), allow_pickle=False)
                manifest["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            manifest["counts"][split] = int(labels.size)
            manifest["counts_per_class"][split] = {classes[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=len(classes)))}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("prepare: %s -> %s %s", raw_dir, prepared_dir, manifest["counts"])
    return PrepareResult(prepared_dir=prepared_dir, counts=manifest["counts"], manifest=manifest)


def load_split(prepared_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) of one prepared split."""
    arrays = []
    for kind in ("images", "labels"):
        path = Path(prepared_dir) / f"{split}-{kind}.npy"
        if not path.is_file():
            raise DataError(f"{path}: missing: run `tuneline stage prepare` (or `dvc repro`) first")
        arrays.append(torch.from_numpy(np.load(path, allow_pickle=False)))
    images = arrays[0] if arrays[0].ndim == 4 else arrays[0].unsqueeze(1)  # prepared before specs: [N, H, W]
    return images, arrays[1]


def load_manifest(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing: run `tuneline stage prepare` (or `dvc repro`) first")
    return json.loads(path.read_text())


def load_spec(prepared_dir: Path) -> InputSpec:
    """The input spec prepare recorded for `prepared_dir`."""
    return InputSpec.from_manifest(load_manifest(prepared_dir))
