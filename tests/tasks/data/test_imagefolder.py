"""The image-folder source keeps colour, size, splits and class names; reads archives; says what it changed or skipped.

Synthetic 3x12x12 RGB PNGs (lossless, so pixels can be compared exactly) and a real slice of CIFAR-10's JPEGs.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.fetch import run_fetch
from tuneline.tasks.data.idx import IMAGES_MAGIC, DataError, read_idx
from tuneline.tasks.data.prepare import load_spec, load_split, run_prepare
from tests.conftest import require_or_skip

CIFAR = Path(__file__).resolve().parents[4] / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def colour_image(label: int, index: int, size: tuple[int, int] = (12, 12)) -> np.ndarray:
    """RGB [H, W, 3]: a class colour plus a per-image ramp, so every image differs and says its class."""
    rng = np.random.default_rng(label * 1000 + index)
    image = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
    image[..., label % 3] += np.uint8(150)
    image[0, 0] = (label, index, 7)
    return image


def write_colour_folder(root: Path, classes: list[str], per_class: int, split: str = "", size=(12, 12)) -> list[np.ndarray]:
    """`root/[split/]class/NNN.png` RGB images; returns them in label-then-file order."""
    written = []
    for label, name in enumerate(classes):
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = colour_image(label, i + (100 if split == "val" else 200 if split == "test" else 0), size)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            written.append(image)
    return written


def fetch(tmp_path: Path, source: Path, name: str = "raw", **cfg):
    return run_fetch(DataConfig(source="imagefolder", image_folder=str(source), **cfg), tmp_path / name)


def test_colour_folder_is_kept_rgb_with_its_spec(tmp_path):
    classes = ["ant", "bee", "cat", "dog"]
    written = np.stack(write_colour_folder(tmp_path / "images", classes, per_class=14))
    raw = fetch(tmp_path, tmp_path / "images").raw_dir
    np.testing.assert_array_equal(read_idx(raw / "images-idx4-ubyte", IMAGES_MAGIC), written)  # exact pixels, RGB
    result = run_prepare(DataConfig(), raw, tmp_path / "prepared")
    spec = load_spec(result.prepared_dir)
    assert spec.shape == (3, 12, 12) and spec.class_names == tuple(classes)
    train, _ = load_split(result.prepared_dir, "train")
    assert train.shape[1:] == (3, 12, 12)
    expected_mean = train.numpy().transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1) / 255
    np.testing.assert_allclose(spec.mean, expected_mean, atol=1e-5)
    assert spec.mean[0] > spec.mean[2]  # ant and dog are red, cat blue: the channels are not averaged away


def test_mixed_sizes_fail_in_one_line_without_image_size_and_are_resized_with_it(tmp_path, caplog):
    write_colour_folder(tmp_path / "images", ["a", "b"], per_class=3)
    for i in range(2):
        Image.fromarray(colour_image(1, 50 + i, size=(40, 30))).save(tmp_path / "images" / "b" / f"big{i}.png")
    odd = tmp_path / "images" / "b" / "big0.png"
    with pytest.raises(DataError) as error:
        fetch(tmp_path, tmp_path / "images")
    assert str(error.value) == (f"{tmp_path / 'images'}: 2 images are not 12x12 (e.g. {odd}: 40x30); "
                                "set data.image_size to resize them all")
    assert "\n" not in str(error.value) and not (tmp_path / "raw").exists()

    with caplog.at_level(logging.INFO, logger="tuneline.tasks.data.imagefolder"):
        result = fetch(tmp_path, tmp_path / "images", image_size=[16, 20])
    assert result.notes == ("resized 8 of 8 images to 16x20 (data.image_size)",)
    assert "resized 8 of 8 images to 16x20" in caplog.text
    assert read_idx(result.raw_dir / "images-idx4-ubyte", IMAGES_MAGIC).shape == (8, 16, 20, 3)


def test_non_image_files_are_skipped_and_logged(tmp_path, caplog):
    write_colour_folder(tmp_path / "images", ["a", "b"], per_class=2)
    for name in ("a/notes.txt", "b/labels.csv", "README.md"):
        (tmp_path / "images" / name).write_text("not an image")
    (tmp_path / "images" / ".cache").mkdir()
    (tmp_path / "images" / ".cache" / "x.bin").write_text("hidden: not data at all")
    with caplog.at_level(logging.INFO, logger="tuneline.tasks.data.imagefolder"):
        result = fetch(tmp_path, tmp_path / "images")
    assert result.counts == {"all": 4}
    folder = tmp_path / "images"
    note = (f"skipped 3 non-image file(s) (not .png/.jpg/.jpeg in a class folder): {folder / 'README.md'}, "
            f"{folder / 'a' / 'notes.txt'}, {folder / 'b' / 'labels.csv'}")
    assert result.notes == (note,) and note in caplog.text


def test_train_and_val_folders_are_honoured(tmp_path):
    classes = ["cat", "dog", "eel"]
    train = write_colour_folder(tmp_path / "images", classes, per_class=12, split="train")
    val = write_colour_folder(tmp_path / "images", classes, per_class=2, split="val")
    result = fetch(tmp_path, tmp_path / "images")
    assert result.counts == {"train": 36, "val": 6}
    assert sorted(p.name for p in result.raw_dir.iterdir()) == [
        "classes.json", "source.json", "train-images-idx4-ubyte", "train-labels-idx1-ubyte",
        "val-images-idx4-ubyte", "val-labels-idx1-ubyte"]
    prepared = run_prepare(DataConfig(), result.raw_dir, tmp_path / "prepared")
    # val is the folder's own, whole; test is carved from train (round(36 / 7) = 5, stratified); the rest is train.
    assert prepared.counts == {"train": 31, "val": 6, "test": 5}
    val_images, val_labels = load_split(prepared.prepared_dir, "val")
    np.testing.assert_array_equal(val_images.numpy(), np.stack(val).transpose(0, 3, 1, 2))
    assert val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    train_rows = {img.tobytes() for img in np.stack(train).transpose(0, 3, 1, 2)}
    for split in ("train", "test"):
        assert all(img.numpy().tobytes() in train_rows for img in load_split(prepared.prepared_dir, split)[0])


def test_train_val_and_test_folders_are_all_kept(tmp_path):
    for split, n in (("train", 8), ("val", 2), ("test", 3)):
        write_colour_folder(tmp_path / "images", ["a", "b"], per_class=n, split=split)
    prepared = run_prepare(DataConfig(), fetch(tmp_path, tmp_path / "images").raw_dir, tmp_path / "prepared")
    assert prepared.counts == {"train": 16, "val": 4, "test": 6}
    test_images, _ = load_split(prepared.prepared_dir, "test")
    assert sorted(int(img[1, 0, 0]) for img in test_images) == sorted([200, 201, 202] * 2)  # index pixel: test's own


def test_train_and_test_folders_draw_val_from_train(tmp_path):
    for split, n in (("train", 12), ("test", 3)):
        write_colour_folder(tmp_path / "images", ["a", "b"], per_class=n, split=split)
    prepared = run_prepare(DataConfig(), fetch(tmp_path, tmp_path / "images").raw_dir, tmp_path / "prepared")
    assert prepared.counts == {"train": 22, "val": 2, "test": 6}


def test_class_missing_from_a_split_is_named(tmp_path):
    write_colour_folder(tmp_path / "images", ["a", "b", "c"], per_class=3, split="train")
    write_colour_folder(tmp_path / "images", ["a", "c"], per_class=1, split="val")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'images'))}: class 'b' is missing from split "
                                        r"val/: every split needs a val/b/ folder of images$"):
        fetch(tmp_path, tmp_path / "images")
    assert not (tmp_path / "raw").exists()


def test_empty_class_folder_in_a_split_is_named(tmp_path):
    write_colour_folder(tmp_path / "images", ["a", "b"], per_class=3, split="train")
    (tmp_path / "images" / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"train/c: empty class folder"):
        fetch(tmp_path, tmp_path / "images")


def _tar(folder: Path, archive: Path, top: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return archive


def _zip(folder: Path, archive: Path, top: str) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
        zf.writestr("__MACOSX/._junk", b"resource fork")
    return archive


@pytest.mark.parametrize("make", [_tar, _zip], ids=["tar.gz", "zip"])
def test_archive_gives_the_same_prepared_bytes_as_the_folder(tmp_path, make):
    folder = tmp_path / "images"
    write_colour_folder(folder, ["a", "b"], per_class=8, split="train")
    write_colour_folder(folder, ["a", "b"], per_class=2, split="test")
    archive = make(folder, tmp_path / ("set.tar.gz" if make is _tar else "set.zip"), top="myset")  # wrapped
    outputs = {}
    for name, source in (("folder", folder), ("archive", archive)):
        result = fetch(tmp_path, source, name=f"raw-{name}")
        assert result.counts == {"train": 16, "test": 4}
        prepared = run_prepare(DataConfig(), result.raw_dir, tmp_path / f"prepared-{name}")
        root = prepared.prepared_dir
        outputs[name] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert outputs["archive"] == outputs["folder"]


def test_archive_with_unsafe_member_is_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        data = io.BytesIO()
        Image.fromarray(colour_image(0, 0)).save(data, format="PNG")
        for name in ("a/000.png", "../b/000.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    with pytest.raises(DataError, match=r"member '\.\./b/000\.png' points outside the archive"):
        fetch(tmp_path, archive)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "b").exists()


def test_corrupt_archive_and_wrong_file_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a gzip stream at all" * 10)
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: unreadable archive"):
        fetch(tmp_path, bad)
    other = tmp_path / "data.csv"
    other.write_text("x")
    with pytest.raises(DataError, match="not a folder or an archive"):
        fetch(tmp_path, other)


def test_unreadable_image_in_an_archive_names_the_member(tmp_path):
    folder = tmp_path / "images"
    write_colour_folder(folder, ["a", "b"], per_class=2)
    (folder / "b" / "001.png").write_bytes(b"\x89PNG broken")
    archive = _zip(folder, tmp_path / "set.zip", top="set")
    with pytest.raises(DataError, match=rf"^{re.escape(str(archive))}:set/b/001\.png: unreadable image "
                                        r"\(not an image PIL can identify\): fix or remove the file$"):
        fetch(tmp_path, archive)


def _cifar_slice(dest: Path, per_class: dict[str, int]) -> Path:
    """The first N JPEGs per class of each split of the real CIFAR-10 archive, as a .tar (bytes unchanged)."""
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR) as src, tarfile.open(dest, "w") as out:
        for member in src:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and taken.get(tuple(parts[:2]), 0) < per_class[parts[0]]:
                taken[tuple(parts[:2])] = taken.get(tuple(parts[:2]), 0) + 1
                out.addfile(member, src.extractfile(member))
    return dest


def test_real_cifar10_slice_gives_a_3x32x32_spec_with_its_class_names(tmp_path):
    if not CIFAR.is_file():  # a skip here, a failure in CI (CI=true)
        require_or_skip(f"{CIFAR} not present: the CIFAR-10 JPEG archive (shared/data/cifar10, beside the checkout)")
    archive = _cifar_slice(tmp_path / "cifar-slice.tar", {"train": 20, "test": 5})
    result = fetch(tmp_path, archive)
    assert result.counts == {"train": 200, "test": 50} and result.notes == ()
    assert json.loads((result.raw_dir / "classes.json").read_text()) == CIFAR_CLASSES
    prepared = run_prepare(DataConfig(), result.raw_dir, tmp_path / "prepared")
    spec = load_spec(prepared.prepared_dir)
    assert spec.shape == (3, 32, 32) and list(spec.class_names) == CIFAR_CLASSES
    assert prepared.counts == {"train": 183, "val": 17, "test": 50}
    assert len(set(spec.mean)) == 3  # real colour: three different channel means
