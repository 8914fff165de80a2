"""Stage `fetch`: real MNIST from a mirror folder, crafted bad mirrors, atomicity, and the image-folder source."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.fetch import MNIST_SHA256, resolve_mirror, run_fetch
from tuneline.tasks.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, encode_idx, read_idx

MNIST_FILES = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (relative path -> file bytes, None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def dot_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def at(path: Path, problem: str) -> str:
    """Regex: the message starts with the file's full path, then the problem."""
    return rf"^{re.escape(str(path))}: {problem}"


# --- the real mirror -------------------------------------------------------------------------------------------


def test_fetch_real_mirror_writes_idx_files_and_classes(fetched, real_mirror):
    raw = fetched.raw_dir
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_FILES | {"classes.json"})  # no .download left
    assert fetched.counts == {"train": 60000, "test": 10000}
    assert fetched.source == f"mnist:{real_mirror}"
    assert json.loads((raw / "classes.json").read_text()) == [str(d) for d in range(10)]
    for name in MNIST_FILES:  # decompressed, byte-identical to the MNIST release
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == MNIST_SHA256[name]
    assert dot_entries(raw.parent) == []  # no staging folder left beside it


def test_fetched_idx_files_parse_with_expected_shapes(raw_arrays):
    assert raw_arrays["train_images"].shape == (60000, 28, 28)
    assert raw_arrays["train_labels"].shape == (60000,)
    assert raw_arrays["test_images"].shape == (10000, 28, 28)
    assert raw_arrays["test_labels"].shape == (10000,)
    assert raw_arrays["train_images"].dtype == np.uint8
    assert set(np.unique(raw_arrays["train_labels"])) == set(range(10))
    assert np.bincount(raw_arrays["test_labels"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_resolve_mirror_prefers_environment_then_config():
    assert resolve_mirror(DataConfig(mirror="/cfg"), "/env") == "/env"
    assert resolve_mirror(DataConfig(mirror="/cfg"), None) == "/cfg"
    assert resolve_mirror(DataConfig(mirror="/cfg"), "") == "/cfg"
    assert resolve_mirror(DataConfig(), None) is None


# --- crafted bad mirrors ---------------------------------------------------------------------------------------
# fetch checks, per pair (train first, then t10k): each file's gzip and IDX structure, then that images and labels
# pair up, then the label range, then each file's content checksum. Each case breaks one file so that exactly the
# intended check is the first to fail.


def _labels_with(raw_arrays, edit) -> bytes:
    """The real train labels, edited in place by `edit`, as gz bytes."""
    labels = raw_arrays["train_labels"].copy()
    edit(labels)
    return gz(encode_idx(labels))


def _swap_two_labels(labels: np.ndarray) -> None:
    i, j = 0, int(np.argmax(labels != labels[0]))  # two positions holding different digits
    labels[i], labels[j] = labels[j], labels[i]


def _set(labels: np.ndarray, index: int, value: int) -> None:
    labels[index] = value


def _flip_middle_bytes(data: bytes) -> bytes:
    flipped = bytearray(data)
    for i in range(len(flipped) // 2, len(flipped) // 2 + 8):
        flipped[i] ^= 0xFF
    return bytes(flipped)


def _first_images(raw_arrays, n: int = 100) -> bytes:
    return encode_idx(raw_arrays["train_images"][:n])  # 16 + 100*784 = 78416 bytes


def _test_images_one_pixel_changed(raw_arrays) -> bytes:
    images = raw_arrays["test_images"].copy()
    images[5, 14, 14] ^= 0x01
    return gzip.compress(encode_idx(images), compresslevel=1, mtime=0)


def _real_gz(mirror: Path, name: str) -> bytes:
    return (mirror / f"{name}.gz").read_bytes()


# name -> (file to replace, builder(raw_arrays, real_mirror) of its new gz bytes or None to delete it,
#          expected message after the file path)
BAD_CASES = {
    "wrong magic (labels in the images slot)": (
        "train-images-idx3-ubyte", lambda a, m: gz(encode_idx(a["train_labels"])),
        r"wrong magic number 2049 \(expected 2051 for IDX images\): is this the right file\?"),
    "wrong magic (images in the labels slot)": (
        "train-labels-idx1-ubyte", lambda a, m: gz(_first_images(a)),
        r"wrong magic number 2051 \(expected 2049 for IDX labels\)"),
    "truncated gzip": (
        "train-labels-idx1-ubyte", lambda a, m: (b := _real_gz(m, "train-labels-idx1-ubyte"))[: len(b) // 2],
        r"truncated gzip \(the stream ends early\): re-fetch the file"),
    "corrupt gzip (not gzip at all)": (
        "train-images-idx3-ubyte", lambda a, m: bytes(range(256)) * 8,
        r"corrupt gzip \(Not a gzipped file .*\): re-fetch the file"),
    "corrupt gzip (flipped bytes in the deflate stream)": (
        "train-labels-idx1-ubyte", lambda a, m: _flip_middle_bytes(_real_gz(m, "train-labels-idx1-ubyte")),
        r"corrupt gzip \(.+\): re-fetch the file"),
    "IDX truncated": (
        "train-images-idx3-ubyte", lambda a, m: gz(_first_images(a)[:-784]),
        r"truncated \(expected 78416 bytes, got 77632\): re-fetch the file"),
    "IDX header truncated": (
        "train-images-idx3-ubyte", lambda a, m: gz(_first_images(a)[:10]),
        r"truncated IDX header \(10 bytes, need 16\): re-fetch the file"),
    "IDX trailing bytes": (
        "train-images-idx3-ubyte", lambda a, m: gz(_first_images(a) + b"\0\0\0"),
        r"has trailing bytes \(expected 78416 bytes, got 78419\): re-fetch the file"),
    "count mismatch": (
        "train-labels-idx1-ubyte", lambda a, m: gz(encode_idx(a["train_labels"][:59999])),
        r"59999 labels but train-images-idx3-ubyte\S* holds 60000 images: the two files come from different sets; "
        r"re-fetch both"),
    "label out of range": (
        "train-labels-idx1-ubyte", lambda a, m: _labels_with(a, lambda labels: _set(labels, 123, 12)),
        r"label 12 at index 123 is out of range 0\.\.9: the file is corrupt; re-fetch it"),
    "checksum mismatch (train labels, two labels swapped)": (
        "train-labels-idx1-ubyte", lambda a, m: _labels_with(a, _swap_two_labels),
        r"checksum mismatch \(content sha256 [0-9a-f]{12}…, "
        rf"expected {MNIST_SHA256['train-labels-idx1-ubyte'][:12]}…"
        r"\): the file is not the MNIST release; re-fetch it"),
    "checksum mismatch (test images, one pixel changed)": (
        "t10k-images-idx3-ubyte", lambda a, m: _test_images_one_pixel_changed(a),
        r"checksum mismatch \(content sha256 [0-9a-f]{12}…, "
        rf"expected {MNIST_SHA256['t10k-images-idx3-ubyte'][:12]}…"
        r"\): the file is not the MNIST release; re-fetch it"),
    "file missing from the mirror": (
        "t10k-labels-idx1-ubyte", lambda a, m: None,
        r"not found in mirror .*: point data\.mirror \(or TUNELINE_DATA_MIRROR\) at a folder"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_fetch_bad_mirror_names_file_and_problem(case, raw_arrays, real_mirror, bad_mirror, tmp_path):
    name, build, problem = BAD_CASES[case]
    mirror = bad_mirror({name: build(raw_arrays, real_mirror)})
    raw_dir = tmp_path / "data" / "raw"
    with pytest.raises(DataError, match=at(mirror / f"{name}.gz", problem)):
        run_fetch(DataConfig(), raw_dir, mirror=str(mirror))
    assert not raw_dir.exists()
    assert list(raw_dir.parent.iterdir()) == []


# --- nothing half-written --------------------------------------------------------------------------------------


def test_failed_fetch_keeps_previous_raw_dir_unchanged(raw_arrays, bad_mirror, tmp_path):
    raw_dir = tmp_path / "data" / "raw"
    (raw_dir / "sub").mkdir(parents=True)
    (raw_dir / "train-images-idx3-ubyte").write_bytes(b"previous version")
    (raw_dir / "classes.json").write_text('["a", "b"]')
    (raw_dir / "sub" / "note.txt").write_text("kept")
    before = snapshot(raw_dir)
    # The train pair passes every check and is written to staging before the test labels fail their checksum.
    labels = raw_arrays["test_labels"].copy()
    _swap_two_labels(labels)
    mirror = bad_mirror({"t10k-labels-idx1-ubyte": gz(encode_idx(labels))})
    with pytest.raises(DataError, match="checksum mismatch"):
        run_fetch(DataConfig(), raw_dir, mirror=str(mirror))
    assert snapshot(raw_dir) == before
    assert sorted(p.name for p in raw_dir.parent.iterdir()) == ["raw"]  # no .raw.* staging or .raw.old folder


def test_failed_fetch_without_previous_raw_dir_creates_nothing(bad_mirror, tmp_path):
    raw_dir = tmp_path / "data" / "raw"
    mirror = bad_mirror({"t10k-labels-idx1-ubyte": None})  # fails after the train pair has been staged
    with pytest.raises(DataError, match="not found in mirror"):
        run_fetch(DataConfig(), raw_dir, mirror=str(mirror))
    assert not raw_dir.exists()
    assert list(raw_dir.parent.iterdir()) == []


def test_failed_image_folder_fetch_keeps_previous_raw_dir(make_image_folder, tmp_path):
    folder, written = make_image_folder(tmp_path / "images", {"a": [".png"] * 2, "b": [".png"] * 2})
    written["b"][1][0].write_bytes(b"not a png")
    raw_dir = tmp_path / "data" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "classes.json").write_text('["x", "y"]')
    before = snapshot(raw_dir)
    with pytest.raises(DataError, match="unreadable image"):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), raw_dir)
    assert snapshot(raw_dir) == before
    assert sorted(p.name for p in raw_dir.parent.iterdir()) == ["raw"]


def test_successful_fetch_replaces_previous_raw_dir_whole(make_image_folder, tmp_path):
    folder, _ = make_image_folder(tmp_path / "images", {"a": [".png"] * 2, "b": [".png"] * 2})
    raw_dir = tmp_path / "data" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "train-images-idx3-ubyte").write_bytes(b"stale")  # must not survive the replacement
    run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), raw_dir)
    assert sorted(p.name for p in raw_dir.iterdir()) == ["classes.json", "images-idx3-ubyte", "labels-idx1-ubyte", "source.json"]
    assert sorted(p.name for p in raw_dir.parent.iterdir()) == ["raw"]  # .raw.old removed too


# --- image-folder source ---------------------------------------------------------------------------------------


def test_image_folder_is_converted_to_idx(make_image_folder, tmp_path):
    # Class names deliberately not in digit order; classes are sorted by name, files by name within a class.
    spec = {"seven": [".png", ".png", ".jpg"], "one": [".png", ".JPEG", ".png", ".png"], "zero": [".png", ".jpeg"]}
    folder, written = make_image_folder(tmp_path / "images", spec, digit_of={"seven": 7, "one": 1, "zero": 0})
    (folder / "one" / "notes.txt").write_text("not an image: ignored")
    (folder / ".thumbnails").mkdir()  # hidden folders are not classes
    (folder / ".thumbnails" / "x.png").write_bytes(b"junk")
    raw_dir = tmp_path / "raw"

    result = run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), raw_dir)

    assert result.counts == {"all": 9}
    assert result.source == f"imagefolder:{folder}"
    assert sorted(p.name for p in raw_dir.iterdir()) == ["classes.json", "images-idx3-ubyte", "labels-idx1-ubyte", "source.json"]
    assert json.loads((raw_dir / "classes.json").read_text()) == ["one", "seven", "zero"]
    images = read_idx(raw_dir / "images-idx3-ubyte", IMAGES_MAGIC)
    labels = read_idx(raw_dir / "labels-idx1-ubyte", LABELS_MAGIC)
    assert images.shape == (9, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    expected = [(path, digit) for name in ("one", "seven", "zero") for path, digit in written[name]]
    for got, (path, digit) in zip(images, expected):
        if path.suffix == ".png":
            np.testing.assert_array_equal(got, digit)  # PNG is lossless
        else:
            assert np.abs(got.astype(int) - digit).mean() < 3, path  # JPEG at quality 95: close


def test_image_folder_keeps_colour_and_size_and_says_what_it_converted(make_image_folder, tmp_path):
    # Was: every image silently became 28x28 gray. Now a 56x56 RGB image among 28x28 gray ones is an error
    # without data.image_size, and with it the set becomes RGB (auto) and the odd image is resized, both logged.
    folder, written = make_image_folder(tmp_path / "images", {"a": [".png"], "b": [".png"]})
    digit = written["b"][0][1]
    Image.fromarray(digit).resize((56, 56), Image.Resampling.NEAREST).convert("RGB").save(folder / "b" / "big.png")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder))}: 1 images are not 28x28 "
                                        rf"\(e\.g\. {re.escape(str(folder / 'b' / 'big.png'))}: 56x56\); set data\.image_size"):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()

    raw_dir = tmp_path / "raw"
    result = run_fetch(DataConfig(source="imagefolder", image_folder=str(folder), image_size=28), raw_dir)
    assert result.counts == {"all": 3}
    assert result.notes == ("converted 2 of 3 images to RGB (data.channels=auto: the set has colour images)",
                            "resized 1 of 3 images to 28x28 (data.image_size)")
    images = read_idx(raw_dir / "images-idx4-ubyte", IMAGES_MAGIC)
    assert images.shape == (3, 28, 28, 3)
    assert read_idx(raw_dir / "labels-idx1-ubyte", LABELS_MAGIC).tolist() == [0, 1, 1]
    np.testing.assert_array_equal(images[0], np.repeat(written["a"][0][1][..., None], 3, axis=2))  # gray -> RGB exact
    assert np.abs(images[2].astype(int) - digit[..., None]).mean() < 10  # 56x56 -> 28x28, close to the digit

    gray = run_fetch(DataConfig(source="imagefolder", image_folder=str(folder), image_size=28, channels=1),
                     tmp_path / "gray")
    assert gray.notes == ("converted 1 of 3 images to gray (data.channels=1)",
                          "resized 1 of 3 images to 28x28 (data.image_size)")
    assert read_idx(tmp_path / "gray" / "images-idx3-ubyte", IMAGES_MAGIC).shape == (3, 28, 28)


def test_image_folder_empty_class_folder_is_named(make_image_folder, tmp_path):
    folder, _ = make_image_folder(tmp_path / "images", {"a": [".png"], "b": [".png"]})
    (folder / "c").mkdir()
    (folder / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=at(folder / "c", r"empty class folder \(no \.png/\.jpg/\.jpeg files\)")):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_image_folder_unreadable_image_is_named(make_image_folder, tmp_path):
    folder, written = make_image_folder(tmp_path / "images", {"a": [".png", ".png"], "b": [".png"]})
    bad = written["a"][1][0]
    bad.write_bytes(b"\x89PNG garbage, not an image" * 4)
    with pytest.raises(DataError, match=at(bad, r"unreadable image \(.+\): fix or remove the file")):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_image_folder_truncated_png_is_named(make_image_folder, tmp_path):
    folder, written = make_image_folder(tmp_path / "images", {"a": [".png"], "b": [".png"]})
    bad = written["b"][0][0]
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError, match=at(bad, "unreadable image")):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), tmp_path / "raw")


@pytest.mark.parametrize("extra", [None, ".hidden"])
def test_image_folder_needs_two_class_folders(make_image_folder, tmp_path, extra):
    folder, _ = make_image_folder(tmp_path / "images", {"only": [".png", ".png"]})
    if extra:
        make_image_folder(folder, {extra: [".png"]})  # a hidden folder is not a class
    (folder / "stray.png").write_bytes((folder / "only" / "000.png").read_bytes())  # files at the top: not classes
    with pytest.raises(DataError, match=at(folder, r"found 1 class sub-folder\(s\), need at least 2")):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_image_folder_with_no_class_folders(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(DataError, match=at(folder, r"found 0 class sub-folder\(s\), need at least 2")):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(folder)), tmp_path / "raw")


def test_image_folder_missing_or_unset(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=at(missing, "image folder not found")):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(missing)), tmp_path / "raw")
    with pytest.raises(DataError, match=r"^data\.image_folder: not set"):
        run_fetch(DataConfig(source="imagefolder"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folders left behind
