"""Fixtures for the data-stage tests: the real MNIST mirror, one fetched raw dir and one full prepare per session.

Everything here is real data or small files crafted from it; nothing is mocked and nothing uses the network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.fetch import FetchResult, run_fetch
from tuneline.tasks.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from tuneline.tasks.data.prepare import PrepareResult, run_prepare

REPO = Path(__file__).resolve().parents[2]
SHARED_MIRROR = REPO.parent / "shared" / "data" / "MNIST" / "raw"
GZ_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="session")
def real_mirror() -> Path:
    """The folder holding the four real MNIST .gz files (read-only; never written to)."""
    mirror = Path(os.environ.get("TUNELINE_DATA_MIRROR") or SHARED_MIRROR)
    missing = [n for n in GZ_NAMES if not (mirror / f"{n}.gz").is_file()]
    if missing:
        pytest.fail(f"MNIST mirror {mirror} lacks {missing}: "
                    "set TUNELINE_DATA_MIRROR to a folder with the four .gz files")
    return mirror


@pytest.fixture(scope="session")
def fetched(real_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> FetchResult:
    """One real fetch from the mirror folder, shared by every test that needs raw IDX files (do not modify)."""
    raw_dir = tmp_path_factory.mktemp("fetched") / "raw"
    return run_fetch(DataConfig(), raw_dir, mirror=str(real_mirror))


@pytest.fixture(scope="session")
def raw_dir(fetched: FetchResult) -> Path:
    return fetched.raw_dir


@pytest.fixture(scope="session")
def raw_arrays(raw_dir: Path) -> dict[str, np.ndarray]:
    """The fetched IDX files as arrays: train/test images and labels."""
    return {
        "train_images": read_idx(raw_dir / "train-images-idx3-ubyte", IMAGES_MAGIC),
        "train_labels": read_idx(raw_dir / "train-labels-idx1-ubyte", LABELS_MAGIC),
        "test_images": read_idx(raw_dir / "t10k-images-idx3-ubyte", IMAGES_MAGIC),
        "test_labels": read_idx(raw_dir / "t10k-labels-idx1-ubyte", LABELS_MAGIC),
    }


@pytest.fixture(scope="session")
def prepared_full(raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    """One prepare of the full fetched data with the default DataConfig (do not modify)."""
    return run_prepare(DataConfig(), raw_dir, tmp_path_factory.mktemp("prepared_full") / "prepared")


@pytest.fixture
def bad_mirror(real_mirror: Path, tmp_path: Path):
    """A writable copy of the real mirror; call it with {name: gz bytes or None} to replace or delete files."""

    def build(replacements: dict[str, bytes | None]) -> Path:
        mirror = tmp_path / "mirror"
        mirror.mkdir()
        for name in GZ_NAMES:
            shutil.copyfile(real_mirror / f"{name}.gz", mirror / f"{name}.gz")
        for name, data in replacements.items():
            assert name in GZ_NAMES, name
            target = mirror / f"{name}.gz"
            if data is None:
                target.unlink()
            else:
                target.write_bytes(data)
        return mirror

    return build


@pytest.fixture
def make_image_folder(raw_arrays: dict[str, np.ndarray]):
    """Write an image folder of real MNIST test digits: {class name: [suffix, ...]} -> (folder, expected arrays).

    Each class takes digits of its own label (the class's index in `digit_of`, default: sorted position), one
    file per suffix, named 000.<suffix>, 001.<suffix>, ...; returns the folder and, per class in sorted file
    order, the source digits written (PNG is lossless, JPEG is not).
    """
    from PIL import Image

    images, labels = raw_arrays["test_images"], raw_arrays["test_labels"]

    def build(root: Path, spec: dict[str, list[str]], digit_of: dict[str, int] | None = None):
        written: dict[str, list[tuple[Path, np.ndarray]]] = {}
        for position, (name, suffixes) in enumerate(sorted(spec.items())):
            digit = (digit_of or {}).get(name, position)
            pool = images[labels == digit]
            class_dir = root / name
            class_dir.mkdir(parents=True)
            written[name] = []
            for i, suffix in enumerate(suffixes):
                path = class_dir / f"{i:03d}{suffix}"
                img = Image.fromarray(pool[i])
                if suffix.lower() in (".jpg", ".jpeg"):
                    img.save(path, format="JPEG", quality=95)
                else:
                    img.save(path, format="PNG")
                written[name].append((path, pool[i]))
        return root, written

    return build
