"""Stage `prepare`: raw IDX files -> stratified train/val/test shards + a manifest describing them.

The official MNIST test set is kept apart; validation is carved out of the training set with a seeded,
per-class shuffle, so the same seed always gives the same split. Records stay uint8 (a quarter of the float32
size); normalisation statistics are computed on the training split and recorded in the manifest so that
training, export and serving all use the same numbers.

Prepare streams: the split is decided from the labels alone (8 bytes an image), then each shard is an
independent task that reads its images' rows of the raw IDX file, writes its `.npy` files
(tasks/data/shards.py) and returns its pixel moments. So memory holds one shard at a time, whatever the data's
size, and the tasks can run anywhere: in this process (`data.prepare_tasks: local`) or fanned out by Prefect
(`prefect`, tasks/data/fanout.py) on the task runner `data.prepare_task_runner` names (Dask, Ray).
The train split is stored in a seeded shuffled order, so a reader that shuffles shard order and the records
within a shard (tasks/data/stream.py) mixes classes as a global shuffle would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneline.core.atomic import staged_dir
from tuneline.core.config.data import DataConfig
from tuneline.core.spec import InputSpec
from tuneline.tasks.data.idx import LABELS_MAGIC, DataError, check_pair, map_idx_images, read_idx, read_idx_rows
from tuneline.tasks.data.shards import (FORMAT, RecordLayout, Shard, SplitShards, large_buffers_straight_to_the_os,
                                        sha256_file, shard_plan, split_entry, write_shard)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TEST_FRACTION_WITHOUT_TEST_SET = 1 / 7  # image folders have no official test set; MNIST's ratio is 10k/70k
TRAIN_ORDER_STREAM = 7  # the train split's stored order is drawn from default_rng((data.seed, this))


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


@dataclass(frozen=True)
class RawSet:
    """One raw IDX pair: the images file (memory-mapped when a shard needs it) and its labels (read whole)."""

    images_path: Path
    labels: np.ndarray

    def images(self) -> np.ndarray:
        return map_idx_images(self.images_path)


def _read_raw_set(raw_dir: Path, stem: str, n_classes: int) -> RawSet | None:
    prefix = f"{stem}-" if stem else ""
    for ndim in (3, 4):  # gray [N, H, W] or colour [N, H, W, C]
        images_path = raw_dir / f"{prefix}images-idx{ndim}-ubyte"
        if images_path.is_file():
            labels_path = raw_dir / f"{prefix}labels-idx1-ubyte"
            images, labels = map_idx_images(images_path), read_idx(labels_path, LABELS_MAGIC)
            check_pair(images, labels, images_path, labels_path, n_classes=n_classes)
            return RawSet(images_path, labels.astype(np.int64))
    return None


@dataclass(frozen=True)
class SplitRows:
    """A prepared split as rows of one raw set, in the order they are stored."""

    raw: RawSet
    rows: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return self.raw.labels[self.rows]


def _load_raw(raw_dir: Path) -> tuple[dict[str, SplitRows], list[str], str, tuple[int, ...]]:
    classes_path = raw_dir / "classes.json"
    if not classes_path.is_file():
        raise DataError(f"{classes_path}: missing: run `tuneline stage fetch` (or `dvc repro`) first")
    classes = json.loads(classes_path.read_text())
    sets: dict[str, RawSet] = {}
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
    splits = {name: SplitRows(raw, np.arange(raw.labels.size)) for name, raw in sets.items()}
    if "test" not in splits:  # carve the test set out first, with its own seed stream: it depends only on the data
        train = splits["train"]
        test_idx, train_idx = stratified_take(train.labels, round(train.labels.size * TEST_FRACTION_WITHOUT_TEST_SET),
                                              seed=1)
        splits["train"], splits["test"] = SplitRows(train.raw, train_idx), SplitRows(train.raw, test_idx)
        log.info("prepare: the source has no test split: %d images (1/7, stratified) carved from train",
                 test_idx.size)
    shapes = {split: raw.images().shape[1:] for split, raw in sets.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{raw_dir}: splits differ in image shape ({ {k: list(v) for k, v in shapes.items()} }): "
                        "run `tuneline stage fetch` again")
    return splits, classes, source, next(iter(shapes.values()))


def to_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] (gray) or [N, H, W, C] (as images are decoded) -> [N, C, H, W], the one stored layout."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(f"prepare: images of shape {list(images.shape)}: expected [N, H, W] or [N, H, W, C]")


def pixel_moments(images: np.ndarray) -> tuple[int, list[int], list[int]]:
    """(values per channel, per-channel sums, per-channel sums of squares) of NCHW uint8 images, exact integers
    (no float copy of the pixels: CIFAR-10's would be 1.1 GB)."""
    sums, squares = [], []
    for c in range(images.shape[1]):
        values = images[:, c]
        sums.append(int(values.sum(dtype=np.int64)))
        squares.append(int(np.einsum("nhw,nhw->", values, values, dtype=np.int64)))
    return int(images[:, 0].size), sums, squares


def spec_from_moments(shape: tuple[int, int, int], count: int, sums: list[int], squares: list[int],
                      classes: list[str]) -> InputSpec:
    channels, height, width = shape
    means, stds = [], []
    for total, square in zip(sums, squares):
        mean = total / max(count, 1) / 255.0
        var = max(square / max(count, 1) / 255.0**2 - mean**2, 0.0)
        means.append(round(mean, 6))
        stds.append(max(round(var**0.5, 6), 1e-6))  # a constant channel must not divide by zero
    return InputSpec(channels=channels, height=height, width=width, class_names=tuple(classes),
                     mean=tuple(means), std=tuple(stds))


def measure_spec(train_images: np.ndarray, classes: list[str]) -> InputSpec:
    """The input spec of NCHW uint8 training images: shape, classes and per-channel mean/std of pixels / 255."""
    return spec_from_moments(tuple(train_images.shape[1:]), *pixel_moments(train_images), classes)


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: which raw rows, in which order, as which shard of which split. Independent of every
    other shard, so any task runner can run it (it carries paths, not arrays of pixels)."""

    images_path: Path
    rows: np.ndarray      # raw row of each record, in stored order
    labels: np.ndarray    # their labels
    split: str
    index: int
    staging: Path
    layout: RecordLayout


@dataclass(frozen=True)
class ShardDone:
    split: str
    index: int
    shard: Shard
    moments: tuple[int, list[int], list[int]]


def write_shard_task(task: ShardTask) -> ShardDone:
    """Gather the shard's images from the raw file (in file order: forward reads, one per run of consecutive rows),
    store them in the task's order, write the shard. Memory: the shard, about three times over."""
    by_file = np.argsort(task.rows, kind="stable")
    in_file_order = read_idx_rows(task.images_path, task.rows[by_file])
    gathered = np.empty_like(in_file_order)
    gathered[by_file] = in_file_order
    del in_file_order
    records = to_nchw(gathered)
    shard = write_shard(task.staging, task.split, task.index, records, task.labels, task.layout)
    return ShardDone(task.split, task.index, shard, pixel_moments(records))


def _limit(split: SplitRows, limit: int | None, seed: int) -> SplitRows:
    if limit is None or limit >= split.rows.size:
        return split
    keep, _ = stratified_take(split.labels, limit, seed)
    return SplitRows(split.raw, split.rows[keep])


def _splits(cfg: DataConfig, raw: dict[str, SplitRows], n_classes: int) -> dict[str, SplitRows]:
    train, test = _limit(raw["train"], cfg.limit_train, cfg.seed), _limit(raw["test"], cfg.limit_test, cfg.seed)
    if "val" in raw:  # the source's own validation split is kept whole
        splits = {"train": train, "val": raw["val"]}
    else:
        val_idx, train_idx = stratified_take(train.labels, max(n_classes, round(train.rows.size * cfg.val_fraction)),
                                             cfg.seed)
        splits = {"train": SplitRows(train.raw, train.rows[train_idx]), "val": SplitRows(train.raw, train.rows[val_idx])}
    splits["test"] = test
    # Stored shuffled (val and test keep the source's order): a shard then holds every class in proportion.
    order = np.random.default_rng((cfg.seed, TRAIN_ORDER_STREAM)).permutation(splits["train"].rows.size)
    splits["train"] = SplitRows(splits["train"].raw, splits["train"].rows[order])
    return splits


def shard_tasks(cfg: DataConfig, splits: dict[str, SplitRows], shape: tuple[int, ...], staging: Path) -> list[ShardTask]:
    layout = RecordLayout("uint8", shape)
    record_bytes = int(np.prod(shape))
    tasks = []
    for split in SPLITS:
        rows = splits[split]
        for index, (start, stop) in enumerate(shard_plan(rows.rows.size, record_bytes, cfg.shard_mb)):
            # Each task its own small arrays (a view would keep the whole split's index alive once per shard).
            part = rows.rows[start:stop].copy()
            tasks.append(ShardTask(rows.raw.images_path, part, rows.raw.labels[part], split, index,
                                   staging, layout))
    return tasks


def run_shard_tasks(cfg: DataConfig, tasks: list[ShardTask]) -> list[ShardDone]:
    """Every shard task, in this process or fanned out by Prefect (data.prepare_tasks)."""
    if cfg.prepare_tasks == "prefect":
        from tuneline.tasks.data.fanout import map_shard_tasks

        return map_shard_tasks(tasks, cfg.prepare_task_runner)
    return [write_shard_task(task) for task in tasks]


def run_prepare(cfg: DataConfig, raw_dir: Path, prepared_dir: Path) -> PrepareResult:
    """Validate `raw_dir`, split it and write `prepared_dir` atomically (temp dir, then rename)."""
    raw_dir, prepared_dir = Path(raw_dir), Path(prepared_dir)
    large_buffers_straight_to_the_os()  # shard after shard of buffers: keep the heap from fragmenting
    from tuneline.tasks.data.prepare_records import is_records, run_prepare_records

    if is_records(raw_dir):  # speech or text
        return run_prepare_records(cfg, raw_dir, prepared_dir)
    raw, classes, source, image_shape = _load_raw(raw_dir)
    splits = _splits(cfg, raw, len(classes))
    shape = (1, *image_shape) if len(image_shape) == 2 else (image_shape[2], *image_shape[:2])
    manifest = {
        # No absolute paths in here: the output (and so its DVC hash) must not depend on where the project lives.
        "format": FORMAT,
        "source": source,
        "classes": classes,
        "record": RecordLayout("uint8", shape).to_dict(),
        "input_spec": None,
        "image_shape": list(shape),
        "normalization": None,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "limits": {"train": cfg.limit_train, "test": cfg.limit_test},
        "shard_mb": cfg.shard_mb,
        "raw_sha256": {p.name: sha256_file(p) for p in sorted(raw_dir.iterdir()) if p.is_file()},
        "counts": {split: int(splits[split].rows.size) for split in SPLITS},
        "counts_per_class": {split: {classes[c]: int(n) for c, n in
                                     enumerate(np.bincount(splits[split].labels, minlength=len(classes)))}
                             for split in SPLITS},
        "splits": {},
    }
    with staged_dir(prepared_dir) as staging:
        done = run_shard_tasks(cfg, shard_tasks(cfg, splits, shape, staging))
        for split in SPLITS:
            shards = sorted((d for d in done if d.split == split), key=lambda d: d.index)
            manifest["splits"][split] = split_entry([d.shard for d in shards])
            if split == "train":
                count = sum(d.moments[0] for d in shards)
                sums = [sum(d.moments[1][c] for d in shards) for c in range(shape[0])]
                squares = [sum(d.moments[2][c] for d in shards) for c in range(shape[0])]
                spec = spec_from_moments(shape, count, sums, squares, classes)
        manifest["input_spec"] = spec.to_dict()
        manifest["normalization"] = {"mean": list(spec.mean), "std": list(spec.std)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("prepare: %s -> %s %s in %s shard(s) of <= %g MB", raw_dir, prepared_dir, manifest["counts"],
             {s: len(manifest["splits"][s]["shards"]) for s in SPLITS}, cfg.shard_mb)
    return PrepareResult(prepared_dir=prepared_dir, counts=manifest["counts"], manifest=manifest)


def open_split(prepared_dir: Path, split: str) -> SplitShards:
    """A prepared split's shards, read lazily (any size); old whole-split folders are read as one shard."""
    return SplitShards(Path(prepared_dir), split, load_manifest(prepared_dir))


def load_split(prepared_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) of one prepared split, whole in memory (the resident path;
    tasks/data/stream.py decides when a split is too large for it)."""
    shards = open_split(prepared_dir, split)
    images, labels = shards.read(0, shards.count)
    shards.close()
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.ascontiguousarray(labels))


def load_manifest(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing: run `tuneline stage prepare` (or `dvc repro`) first")
    return json.loads(path.read_text())


def load_spec(prepared_dir: Path) -> InputSpec:
    """The input spec prepare recorded for `prepared_dir`."""
    return InputSpec.from_manifest(load_manifest(prepared_dir))
