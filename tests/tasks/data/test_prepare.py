"""Stage `prepare`: counts, stratification, determinism, manifest, errors and atomicity, plus `stratified_take`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tuneline.core.spec import InputSpec
import torch

from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.fetch import MNIST_SHA256, run_fetch
from tuneline.tasks.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, encode_idx, read_idx
from tuneline.tasks.data.prepare import (
    TEST_FRACTION_WITHOUT_TEST_SET,
    TRAIN_ORDER_STREAM,
    load_manifest,
    load_split,
    run_prepare,
    stratified_take,
)
from tests.conftest import label_of, write_image_folder

SPLIT_FILES = ["manifest.json", "test", "train", "val"]  # a folder of shards per split (tasks/data/shards.py)
DIGITS = [str(d) for d in range(10)]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def splits_of(prepared_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {split: load_split(prepared_dir, split) for split in ("train", "val", "test")}


def assert_proportional(part_counts: np.ndarray, whole_counts: np.ndarray, part_size: int, tolerance: float = 1.0):
    """Each class's count in the part is within `tolerance` of its proportional share of `part_size`."""
    expected = whole_counts * (part_size / whole_counts.sum())
    assert part_counts.sum() == part_size
    assert np.all(np.abs(part_counts - expected) <= tolerance), (part_counts.tolist(), expected.round(2).tolist())


def write_small_raw(raw_dir: Path, raw_arrays, n_train: int = 700, n_test: int = 140) -> Path:
    """A raw dir in fetch's MNIST layout holding the first `n_train`/`n_test` real digits."""
    raw_dir.mkdir(parents=True)
    for stem, key, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        (raw_dir / f"{stem}-images-idx3-ubyte").write_bytes(encode_idx(raw_arrays[f"{key}_images"][:n]))
        (raw_dir / f"{stem}-labels-idx1-ubyte").write_bytes(encode_idx(raw_arrays[f"{key}_labels"][:n]))
    (raw_dir / "classes.json").write_text(json.dumps(DIGITS))
    return raw_dir


def at(path: Path, problem: str) -> str:
    return rf"^{re.escape(str(path))}: {problem}"


# --- full data (one prepare per session) -----------------------------------------------------------------------


def test_full_prepare_counts(prepared_full):
    assert prepared_full.counts == {"train": 55000, "val": 5000, "test": 10000}
    prepared_dir = prepared_full.prepared_dir
    assert sorted(p.name for p in prepared_dir.iterdir()) == SPLIT_FILES
    assert [p.name for p in prepared_dir.parent.iterdir()] == ["prepared"]  # no staging folder left behind
    for split, (images, labels) in splits_of(prepared_dir).items():
        n = prepared_full.counts[split]
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64


def test_full_prepare_is_stratified(prepared_full, raw_arrays):
    raw_counts = np.bincount(raw_arrays["train_labels"], minlength=10)
    splits = splits_of(prepared_full.prepared_dir)
    val_counts = np.bincount(splits["val"][1].numpy(), minlength=10)
    train_counts = np.bincount(splits["train"][1].numpy(), minlength=10)
    assert_proportional(val_counts, raw_counts, 5000)
    assert_proportional(train_counts, raw_counts, 55000)
    np.testing.assert_array_equal(train_counts + val_counts, raw_counts)


def test_full_prepare_train_and_val_partition_the_raw_training_set(prepared_full, raw_arrays):
    """train/val are exactly the seeded stratified split of the raw training set: val in the raw order, train in
    the seeded shuffled order prepare stores it in (so every shard holds every class in proportion)."""
    val_idx, train_idx = stratified_take(raw_arrays["train_labels"], 5000, seed=0)
    train_idx = train_idx[np.random.default_rng((0, TRAIN_ORDER_STREAM)).permutation(train_idx.size)]
    splits = splits_of(prepared_full.prepared_dir)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        images, labels = splits[split]
        np.testing.assert_array_equal(images.numpy()[:, 0], raw_arrays["train_images"][idx])
        np.testing.assert_array_equal(labels.numpy(), raw_arrays["train_labels"][idx])


def test_full_prepare_leaves_the_test_set_untouched(prepared_full, raw_arrays):
    images, labels = load_split(prepared_full.prepared_dir, "test")
    np.testing.assert_array_equal(images.numpy()[:, 0], raw_arrays["test_images"])
    np.testing.assert_array_equal(labels.numpy(), raw_arrays["test_labels"])


def test_full_prepare_manifest(prepared_full, raw_dir):
    prepared_dir = prepared_full.prepared_dir
    manifest = load_manifest(prepared_dir)
    assert manifest == json.loads((prepared_dir / "manifest.json").read_text()) == prepared_full.manifest
    assert manifest["source"] == "mnist"
    assert manifest["classes"] == DIGITS
    assert manifest["image_shape"] == [1, 28, 28]
    assert manifest["seed"] == 0
    assert manifest["val_fraction"] == DataConfig().val_fraction
    assert manifest["limits"] == {"train": None, "test": None}
    assert manifest["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    # The raw files it was made from: the MNIST release plus classes.json.
    assert manifest["raw_sha256"] == {**MNIST_SHA256, "classes.json": sha256(raw_dir / "classes.json")}
    splits = splits_of(prepared_dir)
    for split, (_, labels) in splits.items():
        per_class = manifest["counts_per_class"][split]
        assert list(per_class) == DIGITS
        assert list(per_class.values()) == np.bincount(labels.numpy(), minlength=10).tolist()
        assert sum(per_class.values()) == manifest["counts"][split]
    # Normalisation: the training split's statistics, close to MNIST's well-known 0.1307 / 0.3081.
    norm = manifest["normalization"]
    assert norm["mean"][0] == pytest.approx(0.1307, abs=1e-3)
    assert norm["std"][0] == pytest.approx(0.3081, abs=1e-3)
    train_pixels = splits["train"][0].numpy().astype(np.float64) / 255.0
    # The exact integer moments give the float64 statistics (to the 6 decimals recorded).
    assert norm == {"mean": [round(float(train_pixels.mean()), 6)], "std": [round(float(train_pixels.std()), 6)]}
    spec = InputSpec.from_manifest(manifest)
    assert spec.shape == (1, 28, 28) and spec.class_names == tuple(DIGITS) and spec.mean == tuple(norm["mean"])
    # Every written shard file is listed with its sha256, and nothing else was written.
    listed = {name: digest for entry in manifest["splits"].values() for shard in entry["shards"]
              for name, digest in zip(shard["files"].values(), shard["sha256"].values())}
    assert sorted(listed) == sorted(str(p.relative_to(prepared_dir)) for p in prepared_dir.rglob("*.npy"))
    for name, digest in listed.items():
        assert sha256(prepared_dir / name) == digest


# --- limits, determinism ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_limited(raw_dir, tmp_path_factory):
    """limit_train=3000, limit_test=1000, seed 0."""
    cfg = DataConfig(limit_train=3000, limit_test=1000)
    return run_prepare(cfg, raw_dir, tmp_path_factory.mktemp("limited") / "prepared")


def test_limited_prepare_counts(prepared_limited):
    assert prepared_limited.counts == {"train": 2750, "val": 250, "test": 1000}
    manifest = load_manifest(prepared_limited.prepared_dir)
    assert manifest["counts"] == prepared_limited.counts
    assert manifest["limits"] == {"train": 3000, "test": 1000}
    for split, (images, labels) in splits_of(prepared_limited.prepared_dir).items():
        assert images.shape == (prepared_limited.counts[split], 1, 28, 28)
        assert labels.shape == (prepared_limited.counts[split],)


def test_limited_prepare_is_stratified(prepared_limited, raw_arrays):
    splits = splits_of(prepared_limited.prepared_dir)
    counts = {split: np.bincount(labels.numpy(), minlength=10) for split, (_, labels) in splits.items()}
    limited_train = counts["train"] + counts["val"]
    assert_proportional(limited_train, np.bincount(raw_arrays["train_labels"], minlength=10), 3000)
    assert_proportional(counts["val"], limited_train, 250)
    assert_proportional(counts["test"], np.bincount(raw_arrays["test_labels"], minlength=10), 1000)


def test_limited_test_set_is_a_stratified_subset_of_t10k(prepared_limited, raw_arrays):
    keep, _ = stratified_take(raw_arrays["test_labels"], 1000, seed=0)
    images, labels = load_split(prepared_limited.prepared_dir, "test")
    np.testing.assert_array_equal(images.numpy()[:, 0], raw_arrays["test_images"][keep])
    np.testing.assert_array_equal(labels.numpy(), raw_arrays["test_labels"][keep])


def test_same_seed_gives_identical_tensors(prepared_limited, raw_dir, tmp_path):
    again = run_prepare(DataConfig(limit_train=3000, limit_test=1000), raw_dir, tmp_path / "prepared")
    first, second = splits_of(prepared_limited.prepared_dir), splits_of(again.prepared_dir)
    for split in ("train", "val", "test"):
        assert torch.equal(first[split][0], second[split][0]), split
        assert torch.equal(first[split][1], second[split][1]), split
    # Byte-identical files (so DVC sees an unchanged output) and an identical manifest.
    assert again.manifest == prepared_limited.manifest
    files = sorted(p.relative_to(again.prepared_dir) for p in again.prepared_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(prepared_limited.prepared_dir)
                           for p in prepared_limited.prepared_dir.rglob("*") if p.is_file())
    for name in files:
        assert sha256(again.prepared_dir / name) == sha256(prepared_limited.prepared_dir / name), name


def test_different_seed_gives_a_different_split(prepared_limited, raw_dir, tmp_path):
    other = run_prepare(DataConfig(limit_train=3000, limit_test=1000, seed=1), raw_dir, tmp_path / "prepared")
    assert other.counts == prepared_limited.counts
    assert other.manifest["seed"] == 1
    first, second = splits_of(prepared_limited.prepared_dir), splits_of(other.prepared_dir)
    assert not torch.equal(first["val"][0], second["val"][0])
    # Same class make-up either way: the split is stratified whatever the seed.
    assert torch.equal(torch.bincount(first["val"][1], minlength=10), torch.bincount(second["val"][1], minlength=10))


def test_different_seed_gives_different_val_indices_on_full_data(raw_arrays):
    labels = raw_arrays["train_labels"]
    val0, _ = stratified_take(labels, 5000, seed=0)
    val0_again, _ = stratified_take(labels, 5000, seed=0)
    val1, _ = stratified_take(labels, 5000, seed=1)
    np.testing.assert_array_equal(val0, val0_again)
    assert not np.array_equal(val0, val1)
    assert len(np.intersect1d(val0, val1)) < 1000  # independent draws of 1/12: about 5000/12 ≈ 417 shared
    np.testing.assert_array_equal(np.bincount(labels[val0], minlength=10), np.bincount(labels[val1], minlength=10))


def test_small_training_set_keeps_one_val_image_per_class(raw_arrays, tmp_path):
    """val holds at least one image per class even when val_fraction of the training set is fewer."""
    raw = write_small_raw(tmp_path / "raw", raw_arrays, n_train=60, n_test=30)
    result = run_prepare(DataConfig(), raw, tmp_path / "prepared")
    assert result.counts == {"train": 50, "val": 10, "test": 30}  # round(60 * 0.083) = 5 < 10 classes
    _, val_labels = load_split(result.prepared_dir, "val")
    train_counts = np.bincount(raw_arrays["train_labels"][:60], minlength=10)
    assert_proportional(np.bincount(val_labels.numpy(), minlength=10), train_counts, 10)


# --- image-folder raw data --------------------------------------------------------------------------------------


def test_prepare_from_image_folder_carves_a_test_split(make_image_folder, tmp_path):
    folder, _ = make_image_folder(tmp_path / "images", {"ant": [".png"] * 14, "bee": [".png"] * 14,
                                                         "cat": [".png"] * 7 + [".jpg"] * 7})
    raw = tmp_path / "raw"
    assert run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), raw).counts == {"all": 42}
    result = run_prepare(DataConfig(), raw, tmp_path / "prepared")
    n_test = round(42 * TEST_FRACTION_WITHOUT_TEST_SET)
    assert n_test == 6
    assert result.counts == {"train": 33, "val": 3, "test": 6}  # val: max(3 classes, round(36 * 0.083) = 3)
    manifest = load_manifest(result.prepared_dir)
    assert manifest["classes"] == ["ant", "bee", "cat"] and manifest["source"] == "imagefolder"
    assert manifest["counts_per_class"] == {
        "train": {"ant": 11, "bee": 11, "cat": 11},
        "val": {"ant": 1, "bee": 1, "cat": 1},
        "test": {"ant": 2, "bee": 2, "cat": 2},
    }
    splits = splits_of(result.prepared_dir)
    all_images = np.concatenate([splits[s][0].numpy() for s in ("train", "val", "test")])
    assert len({img.tobytes() for img in all_images}) == 42  # the three splits share no image
    # The carved test split depends only on the data (its own seed), not on data.seed.
    other = run_prepare(DataConfig(seed=5), raw, tmp_path / "prepared5")
    assert torch.equal(load_split(other.prepared_dir, "test")[0], splits["test"][0])



@pytest.mark.fast
def test_more_than_256_image_folder_classes_keep_their_labels(tmp_path):
    """Labels past 255 do not fit MNIST's ubyte IDX labels: fetch writes them wider and prepare reads them back,
    every image with its own label (synthetic_image writes the label into the pixels: PNG is lossless)."""
    folder = write_image_folder(tmp_path / "images", n_classes=300, per_class=3)
    raw = tmp_path / "raw"
    assert run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), raw).counts == {"all": 900}
    classes = json.loads((raw / "classes.json").read_text())
    assert classes == [f"c{k:03d}" for k in range(300)]
    raw_labels = read_idx(raw / "labels-idx1-ubyte", LABELS_MAGIC)
    assert raw_labels.tolist() == [k for k in range(300) for _ in range(3)]
    np.testing.assert_array_equal(label_of(read_idx(raw / "images-idx3-ubyte", IMAGES_MAGIC)), raw_labels)

    result = run_prepare(DataConfig(), raw, tmp_path / "prepared")
    assert result.manifest["classes"] == classes and sum(result.counts.values()) == 900
    seen = []
    for split, (images, labels) in splits_of(result.prepared_dir).items():
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(labels.numpy(), label_of(images.numpy()[:, 0]))
        per_class = np.bincount(labels.numpy(), minlength=300)
        assert result.manifest["counts_per_class"][split] == {classes[c]: int(n) for c, n in enumerate(per_class)}
        seen += zip(labels.tolist(), images[:, 0, 0, 2].tolist())  # (label, index within its class folder)
    assert sorted(seen) == [(k, i) for k in range(300) for i in range(3)]  # each image once, none relabelled
    assert max(label for label, _ in seen) == 299

# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.fast
def test_missing_raw_dir_says_run_fetch(tmp_path):
    raw = tmp_path / "raw"
    with pytest.raises(DataError, match=at(raw / "classes.json", r"missing: run `tuneline stage fetch`")):
        run_prepare(DataConfig(), raw, tmp_path / "prepared")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_raw_dir_without_idx_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "classes.json").write_text(json.dumps(DIGITS))
    with pytest.raises(DataError, match=at(raw, r"expected MNIST's four IDX files .*run `tuneline stage fetch`")):
        run_prepare(DataConfig(), raw, tmp_path / "prepared")


def _fewer_labels(raw: Path, raw_arrays) -> None:
    (raw / "train-labels-idx1-ubyte").write_bytes(encode_idx(raw_arrays["train_labels"][:699]))


def _label_12(raw: Path, raw_arrays) -> None:
    labels = raw_arrays["test_labels"][:140].copy()
    labels[7] = 12
    (raw / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(labels))


def _truncated_images(raw: Path, raw_arrays) -> None:
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])


def _no_labels(raw: Path, raw_arrays) -> None:
    (raw / "train-labels-idx1-ubyte").unlink()


RAW_FAULTS = {  # name -> (edit of a small valid raw dir, file named, problem)
    "count mismatch": (_fewer_labels, "train-labels-idx1-ubyte",
                       r"699 labels but train-images-idx3-ubyte holds 700 images"),
    "label out of range": (_label_12, "t10k-labels-idx1-ubyte", r"label 12 at index 7 is out of range 0\.\.9"),
    "truncated IDX": (_truncated_images, "t10k-images-idx3-ubyte",
                      r"truncated \(expected 109776 bytes, got 109676\)"),  # 16 + 140 * 784
    "labels file missing": (_no_labels, "train-labels-idx1-ubyte", r"missing: run `tuneline stage fetch`"),
}


@pytest.mark.parametrize("fault", list(RAW_FAULTS))
def test_bad_raw_dir_names_file_and_problem(fault, raw_arrays, tmp_path):
    edit, name, problem = RAW_FAULTS[fault]
    raw = write_small_raw(tmp_path / "raw", raw_arrays)
    run_prepare(DataConfig(), raw, tmp_path / "check")  # the unedited slice prepares fine
    edit(raw, raw_arrays)
    with pytest.raises(DataError, match=at(raw / name, problem)):
        run_prepare(DataConfig(), raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_failed_prepare_keeps_previous_prepared_dir(raw_arrays, tmp_path):
    raw = write_small_raw(tmp_path / "raw", raw_arrays)
    out = tmp_path / "out"
    prepared = run_prepare(DataConfig(), raw, out / "prepared").prepared_dir
    before = snapshot(prepared)
    _label_12(raw, raw_arrays)
    with pytest.raises(DataError, match="label 12"):
        run_prepare(DataConfig(seed=3), raw, prepared)
    assert snapshot(prepared) == before
    assert [p.name for p in out.iterdir()] == ["prepared"]  # no .prepared.* staging folder left


def test_failed_prepare_without_previous_prepared_dir_creates_nothing(raw_arrays, tmp_path):
    raw = write_small_raw(tmp_path / "raw", raw_arrays)
    _truncated_images(raw, raw_arrays)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="truncated"):
        run_prepare(DataConfig(), raw, out / "prepared")
    assert list(out.iterdir()) == []


def test_successful_prepare_replaces_previous_prepared_dir_whole(raw_arrays, tmp_path):
    raw = write_small_raw(tmp_path / "raw", raw_arrays)
    prepared = tmp_path / "out" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "stale.pt").write_bytes(b"old")
    run_prepare(DataConfig(), raw, prepared)
    assert sorted(p.name for p in prepared.iterdir()) == SPLIT_FILES
    assert [p.name for p in prepared.parent.iterdir()] == ["prepared"]


@pytest.mark.fast
def test_load_split_and_manifest_missing_say_run_prepare(tmp_path):
    with pytest.raises(DataError, match=at(tmp_path / "manifest.json", r"missing: run `tuneline stage prepare`")):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match=at(tmp_path / "manifest.json", r"missing: run `tuneline stage prepare`")):
        load_manifest(tmp_path)


def test_prepare_does_not_modify_raw_dir(raw_arrays, tmp_path):
    raw = write_small_raw(tmp_path / "raw", raw_arrays)
    before = snapshot(raw)
    run_prepare(DataConfig(), raw, tmp_path / "prepared")
    assert snapshot(raw) == before


# --- stratified_take --------------------------------------------------------------------------------------------


def _labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.fast
def test_stratified_take_exact_count_and_largest_remainder():
    labels = _labels([50, 30, 20])
    taken, rest = stratified_take(labels, 17, seed=0)
    assert taken.size == 17 and rest.size == 83
    # Shares 8.5, 5.1, 3.4 -> floors 8, 5, 3 (16), the one left over goes to the largest remainder (class 0).
    assert np.bincount(labels[taken], minlength=3).tolist() == [9, 5, 3]


@pytest.mark.fast
def test_stratified_take_is_disjoint_covering_and_sorted():
    labels = _labels([50, 30, 20])
    taken, rest = stratified_take(labels, 17, seed=4)
    assert np.intersect1d(taken, rest).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([taken, rest])), np.arange(labels.size))
    assert np.all(np.diff(taken) > 0) and np.all(np.diff(rest) > 0)
    assert taken.dtype.kind == "i" and rest.dtype.kind == "i"


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(5))
def test_stratified_take_proportions_on_random_labels(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(1, 400, size=rng.integers(2, 12)).tolist()
    labels = _labels(sizes, seed)
    for count in (0, 1, len(sizes), labels.size // 7, labels.size // 2, labels.size - 1, labels.size):
        taken, rest = stratified_take(labels, count, seed)
        assert taken.size == count and rest.size == labels.size - count
        per_class = np.bincount(labels[taken], minlength=len(sizes))
        expected = np.array(sizes) * (count / labels.size)
        assert np.all(np.abs(per_class - expected) < 1), (count, per_class.tolist(), expected.tolist())
        np.testing.assert_array_equal(np.sort(np.concatenate([taken, rest])), np.arange(labels.size))


@pytest.mark.fast
def test_stratified_take_is_deterministic_per_seed():
    labels = _labels([40, 40, 40])
    a, b, c = (stratified_take(labels, 30, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert np.bincount(labels[a[0]]).tolist() == np.bincount(labels[c[0]]).tolist() == [10, 10, 10]


def test_stratified_take_on_real_mnist_labels(raw_arrays):
    labels = raw_arrays["train_labels"]
    taken, rest = stratified_take(labels, 5000, seed=0)
    assert taken.size == 5000 and rest.size == 55000
    assert_proportional(np.bincount(labels[taken], minlength=10), np.bincount(labels, minlength=10), 5000)


@pytest.mark.fast
def test_stratified_take_ignores_label_values_and_order():
    """Class labels need not be 0..k-1 or sorted; the allocation follows the class sizes."""
    labels = np.array([9] * 30 + [3] * 10)
    taken, _ = stratified_take(labels, 8, seed=0)
    assert sorted(labels[taken].tolist()) == [3, 3] + [9] * 6
