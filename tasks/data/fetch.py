"""Stage `fetch`: bring the source data into `paths.raw` as validated, uncompressed IDX files.

MNIST comes from a mirror (a folder or URL holding the four standard .gz files) or torchvision's list
of official mirrors, and is checked against the content checksums below: the decompressed bytes are
the same on every mirror, while the gzip bytes are not, so the DVC hash of `paths.raw` (the data
version) does not depend on where the data came from. An image folder (class sub-folders of PNG/JPEG)
is decoded, checked and written in the same IDX layout, so `prepare` has one code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.atomic import staged_dir
from tasks.config import DataConfig
from tasks.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, check_pair, encode_idx, parse_idx, read_gzip

log = logging.getLogger(__name__)

# sha256 of the decompressed official MNIST files (the values published for the original release).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_PAIRS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_SIDE = 28  # pixels; image-folder inputs are converted to 28x28 grayscale like MNIST


@dataclass(frozen=True)
class FetchResult:
    raw_dir: Path
    source: str
    counts: dict[str, int]


def resolve_mirror(cfg: DataConfig, env_mirror: str | None) -> str | None:
    """The mirror to use: the environment's TUNELINE_DATA_MIRROR, else data.mirror, else None (official)."""
    return env_mirror or cfg.mirror


def _obtain_gz(name: str, mirror: str | None, workdir: Path) -> Path:
    """Return a local path to `<name>.gz`, copied or downloaded from the mirror or the official mirrors."""
    filename = f"{name}.gz"
    if mirror and "://" not in mirror:
        path = Path(mirror).expanduser() / filename
        if not path.is_file():
            raise DataError(f"{path}: not found in mirror {mirror}: point data.mirror (or TUNELINE_DATA_MIRROR) "
                            "at a folder holding the four MNIST .gz files")
        return path
    target = workdir / filename
    if mirror:
        urls = [mirror.rstrip("/") + "/" + filename]
    else:
        from torchvision.datasets import MNIST  # the official mirror list lives there

        urls = [base + filename for base in MNIST.mirrors]
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out)
            return target
        except OSError as exc:
            errors.append(f"{url}: {exc}")
    raise DataError(f"{filename}: download failed from every mirror ({'; '.join(errors)}): "
                    "set TUNELINE_DATA_MIRROR to a folder holding the four MNIST .gz files")


def _fetch_mnist(mirror: str | None, staging: Path) -> dict[str, int]:
    counts = {}
    workdir = staging / ".download"
    workdir.mkdir()
    for split, (images_name, labels_name) in MNIST_PAIRS.items():
        gz_paths, contents, arrays = {}, {}, {}
        for name, magic in ((images_name, IMAGES_MAGIC), (labels_name, LABELS_MAGIC)):
            gz_paths[name] = _obtain_gz(name, mirror, workdir)
            contents[name] = read_gzip(gz_paths[name])
            arrays[name] = parse_idx(contents[name], gz_paths[name], magic)
        # Pairing and label range before the checksum, so a broken file gets the specific diagnosis.
        check_pair(arrays[images_name], arrays[labels_name], gz_paths[images_name], gz_paths[labels_name], n_classes=10)
        for name in (images_name, labels_name):
            digest = hashlib.sha256(contents[name]).hexdigest()
            if digest != MNIST_SHA256[name]:
                raise DataError(f"{gz_paths[name]}: checksum mismatch (content sha256 {digest[:12]}…, expected "
                                f"{MNIST_SHA256[name][:12]}…): the file is not the MNIST release; re-fetch it")
            (staging / name).write_bytes(contents[name])
        counts[split] = int(arrays[labels_name].shape[0])
    shutil.rmtree(workdir)
    (staging / "classes.json").write_text(json.dumps([str(d) for d in range(10)]))
    return counts


def _fetch_image_folder(folder: Path, staging: Path) -> dict[str, int]:
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found: set data.image_folder to a folder of class sub-folders")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{folder}: found {len(classes)} class sub-folder(s), need at least 2 (one per class)")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder / name}: empty class folder (no .png/.jpg/.jpeg files): add images or remove it")
        for path in files:
            try:
                with Image.open(path) as img:
                    gray = img.convert("L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
                    images.append(np.asarray(gray, dtype=np.uint8))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DataError(f"{path}: unreadable image ({exc}): fix or remove the file") from None
            labels.append(index)
    (staging / "images-idx3-ubyte").write_bytes(encode_idx(np.stack(images)))
    # The file name keeps MNIST's; labels past 255 are written as 16- or 32-bit IDX integers (tasks/data/idx.py).
    (staging / "labels-idx1-ubyte").write_bytes(encode_idx(np.asarray(labels, dtype=np.int64)))
    (staging / "classes.json").write_text(json.dumps(classes))
    return {"all": len(labels)}


def run_fetch(cfg: DataConfig, raw_dir: Path, mirror: str | None = None) -> FetchResult:
    """Fetch and validate the source into `raw_dir`, replacing it only when everything checked out."""
    raw_dir = Path(raw_dir)
    # A failure anywhere leaves the previous raw_dir untouched.
    with staged_dir(raw_dir) as staging:
        if cfg.source == "mnist":
            counts = _fetch_mnist(mirror, staging)
            source = f"mnist:{mirror or 'official mirrors'}"
        else:
            if not cfg.image_folder:
                raise DataError("data.image_folder: not set; data.source=imagefolder needs a folder of class sub-folders")
            counts = _fetch_image_folder(Path(cfg.image_folder).expanduser(), staging)
            source = f"imagefolder:{cfg.image_folder}"
    log.info("fetch: %s -> %s %s", source, raw_dir, counts)
    return FetchResult(raw_dir=raw_dir, source=source, counts=counts)
