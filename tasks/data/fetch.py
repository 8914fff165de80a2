"""Stage `fetch`: bring the source data into `paths.raw` as validated, uncompressed IDX files.

MNIST comes from a mirror (a folder or URL holding the four standard .gz files) or torchvision's list
of official mirrors, and is checked against the content checksums below: the decompressed bytes are
the same on every mirror, while the gzip bytes are not, so the DVC hash of `paths.raw` (the data
version) does not depend on where the data came from. An image folder (class sub-folders of PNG/JPEG, or an
archive of them, local or at a URL; tasks/data/imagefolder.py) is streamed into the same IDX layout a
user's `module:function` loader's arrays and the server's captured image requests (tasks/data/capture.py) are written in
(`write_raw`; tasks/data/loader.py), so `prepare` has one code path. Everything is written to a staging folder that replaces `paths.raw` only once complete.
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

from tuneline.core.atomic import staged_dir
from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, check_pair, encode_idx, parse_idx, read_gzip
from tuneline.tasks.data.imagefolder import fetch_image_folder
from tuneline.tasks.data.loader import run_loader
from tuneline.tasks.data.remote import is_url

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


@dataclass(frozen=True)
class FetchResult:
    raw_dir: Path
    source: str
    counts: dict[str, int]
    notes: tuple[str, ...] = ()  # conversions and skipped files, one line each (also logged)


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


def write_raw(staging: Path, sets: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], source: str) -> None:
    """The raw layout of every source but MNIST: per split (`all` when the source has no splits)
    `<split>-images-idx{3,4}-ubyte` (gray [N, H, W] or colour [N, H, W, C]) and `<split>-labels-idx1-ubyte`,
    `classes.json`, and `source.json` naming the kind of source (never a path: the raw data's DVC hash must
    not depend on where the source lies, so a folder and its archive give the same bytes)."""
    for split, (images, labels) in sets.items():
        stem = "" if split == "all" else f"{split}-"
        (staging / f"{stem}images-idx{images.ndim}-ubyte").write_bytes(encode_idx(images))
        # Labels past 255 are written as 16- or 32-bit IDX integers (tasks/data/idx.py).
        (staging / f"{stem}labels-idx1-ubyte").write_bytes(encode_idx(np.asarray(labels, dtype=np.int64)))
    _write_meta(staging, classes, source)


def _write_meta(staging: Path, classes: list[str], source: str) -> None:
    (staging / "classes.json").write_text(json.dumps(classes))
    (staging / "source.json").write_text(json.dumps({"source": source}) + "\n")


def _fetch_image_folder(source: str, cfg: DataConfig, staging: Path) -> tuple[dict[str, int], list[str]]:
    """The same files write_raw() writes, streamed: the images are never all in memory (imagefolder.py)."""
    fetched = fetch_image_folder(source, cfg, staging)
    _write_meta(staging, fetched.classes, "imagefolder")
    return fetched.counts, fetched.notes


def _fetch_loader(cfg: DataConfig, project_dir: Path, staging: Path) -> dict[str, int]:
    classes, sets = run_loader(cfg.source, cfg.options, project_dir)
    write_raw(staging, sets, classes, cfg.source)
    return {split: int(labels.size) for split, (_, labels) in sets.items()}


def run_fetch(cfg: DataConfig, raw_dir: Path, mirror: str | None = None, project_dir: Path | None = None,
              capture_dir: Path | None = None, registry_dir: Path | None = None) -> FetchResult:
    """Fetch and validate the source into `raw_dir`, replacing it only when everything checked out.

    `project_dir` (default: the working directory, where DVC runs a stage) is where a relative
    data.image_folder lies, as dvc.yaml's `${data.image_folder}` dep resolves it, and where a
    `module:function` loader is imported from. A data.image_folder URL (`scheme://…`) is read where it lies.
    source=capture reads `capture_dir` (default project_dir / data.capture_dir) and the captured model's input spec
    from the registry at `registry_dir` (tasks/data/capture.py).
    """
    raw_dir = Path(raw_dir)
    project_dir = Path(project_dir) if project_dir is not None else Path.cwd()
    notes: list[str] = []
    # A failure anywhere leaves the previous raw_dir untouched.
    with staged_dir(raw_dir) as staging:
        if cfg.source == "mnist":
            counts = _fetch_mnist(mirror, staging)
            source = f"mnist:{mirror or 'official mirrors'}"
        elif cfg.source in ("audio", "text"):
            from tuneline.tasks.data.records import fetch_audio, fetch_text

            given = cfg.audio_folder if cfg.source == "audio" else cfg.text_files
            if not given:
                key = "audio_folder" if cfg.source == "audio" else "text_files"
                raise DataError(f"data.{key}: not set; data.source={cfg.source} needs it (docs/data.md)")
            where = given if is_url(given) else str(project_dir / Path(given).expanduser())
            counts, _, notes = (fetch_audio if cfg.source == "audio" else fetch_text)(cfg, where, staging)
            source = f"{cfg.source}:{given}"
        elif cfg.source == "capture":
            from tuneline.tasks.data.capture import fetch_capture

            folder = Path(capture_dir) if capture_dir is not None else project_dir / cfg.capture_dir
            counts, notes = fetch_capture(cfg, folder, registry_dir, staging)
            source = f"capture:{cfg.capture_model}"
        elif cfg.loader:
            counts = _fetch_loader(cfg, project_dir, staging)
            source = cfg.loader
        else:
            if not cfg.image_folder:
                raise DataError("data.image_folder: not set; data.source=imagefolder needs a folder of class sub-folders "
                                "(or an archive of one)")
            folder = cfg.image_folder
            if not is_url(folder):
                folder = str(project_dir / Path(folder).expanduser())
            counts, notes = _fetch_image_folder(folder, cfg, staging)
            source = f"imagefolder:{cfg.image_folder}"
    log.info("fetch: %s -> %s %s", source, raw_dir, counts)
    return FetchResult(raw_dir=raw_dir, source=source, counts=counts, notes=tuple(notes))
