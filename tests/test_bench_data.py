"""bench/bench_data.py's synthetic image folder: the count, the image size and the class folders asked for, the
same pixels from the same seed, and a complete folder reused rather than written again (no stages are run)."""

from __future__ import annotations

import pytest
from PIL import Image

from bench.bench_data import generate_folder


@pytest.mark.slow
def test_generated_folder_has_the_count_size_and_classes(tmp_path):
    made = generate_folder(tmp_path / "images", 105, side=64, ext="jpg", seed=3, processes=2, quiet=True)

    classes = sorted(p.name for p in (tmp_path / "images").iterdir() if not p.name.startswith("."))
    assert classes == [f"class{k:02d}" for k in range(10)]
    files = sorted((tmp_path / "images").glob("class*/*.jpg"))
    assert len(files) == made["count"] == 105
    assert sorted(len(list((tmp_path / "images" / c).iterdir())) for c in classes) == [10] * 5 + [11] * 5
    with Image.open(files[0]) as image:
        assert (image.size, image.mode) == ((64, 64), "RGB")

    again = generate_folder(tmp_path / "images", 105, side=64, ext="jpg", seed=3, quiet=True)
    assert again["reused"] and not made["reused"]
    other = generate_folder(tmp_path / "other", 105, side=64, ext="jpg", seed=3, processes=1, quiet=True)
    assert not other["reused"]
    assert (tmp_path / "other" / "class04" / "0000054.jpg").read_bytes() == \
        (tmp_path / "images" / "class04" / "0000054.jpg").read_bytes()  # same seed, any pool size: same bytes
