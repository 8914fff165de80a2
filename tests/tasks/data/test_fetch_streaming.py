"""Stage fetch streams an image folder: the same IDX bytes whether it decodes in this process or on worker
processes, from a folder, an archive or a URL; memory that does not grow with the set; nothing half-written.

The expected bytes are computed here, image by image with PIL, not by Tuneline's code. Small synthetic
PNG/JPEG images; a local http.server on 127.0.0.1 for the URLs (no other network).
"""

from __future__ import annotations

import functools
import gc
import io
import random
import re
import struct
import tarfile
import threading
import tracemalloc
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuneline.core.config.data import DataConfig
from tuneline.flows.dvc_yaml import source_deps
from tuneline.tasks.data import workers
from tuneline.tasks.data.decode import ProbeTask, probe_chunk
from tuneline.tasks.data.fetch import run_fetch
from tuneline.tasks.data.idx import DataError

CLASSES = ["ant", "bee", "cat"]
SPLITS = {"test": 4, "train": 16}  # per class: 60 images


def _image(label: int, index: int, kind: str) -> Image.Image:
    rng = np.random.default_rng(label * 100 + index)
    if kind == "gray":
        return Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8))
    if kind == "gray-palette":  # a palette of grays: a gray image
        image = Image.fromarray(rng.integers(0, 8, (12, 12), dtype=np.uint8), mode="L").convert("P")
        image.putpalette([v * 30 for v in range(8) for _ in range(3)])
        return image
    pixels = rng.integers(0, 200, (12, 12, 3), dtype=np.uint8)
    pixels[..., label] += 50
    if kind == "big":  # another size: needs data.image_size
        return Image.fromarray(pixels).resize((20, 16))
    return Image.fromarray(pixels)


def write_mixed_folder(root: Path) -> list[tuple[Path, int]]:
    """`root/<split>/<class>/NN.{png,jpg}`: gray and colour PNGs, colour JPEGs, a gray palette PNG and one
    16x20 image among 12x12 ones. Returns (path, label) in image order (split, class, name)."""
    written = []
    kinds = ["colour", "gray", "jpeg", "colour", "gray-palette", "jpeg", "gray"]
    for split in sorted(SPLITS):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(SPLITS[split]):
                kind = "big" if (split, label, i) == ("train", 1, 3) else kinds[(i + label) % len(kinds)]
                path = folder / f"{i:02d}.{'jpg' if kind == 'jpeg' else 'png'}"
                _image(label, i, kind).save(path, quality=90)
                written.append((path, label))
    return written


def expected_files(written: list[tuple[Path, int]], size: tuple[int, int]) -> dict[str, bytes]:
    """The IDX files as stacking the images would give them: RGB (the set has colour), resized bilinear."""
    files = {}
    for split in sorted(SPLITS):
        images, labels = [], []
        for path, label in written:
            if path.parts[-3] != split:
                continue
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            if rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            images.append(np.asarray(rgb, dtype=np.uint8))
            labels.append(label)
        stack = np.stack(images)
        files[f"{split}-images-idx4-ubyte"] = struct.pack(">5i", 2052, *stack.shape) + stack.tobytes()
        files[f"{split}-labels-idx1-ubyte"] = struct.pack(">2i", 2049, len(labels)) + bytes(labels)
    return files


def idx_files(raw: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(raw.iterdir()) if "idx" in p.name}


def fetch(tmp_path: Path, source, name: str, **cfg):
    return run_fetch(DataConfig(source="imagefolder", image_folder=str(source), **cfg), tmp_path / name)


def tar_shuffled(folder: Path, archive: Path) -> Path:
    """A .tar.gz of `folder` under a wrapping top folder, members in a shuffled order (not the image order)."""
    paths = sorted(folder.rglob("*"))
    random.Random(0).shuffle(paths)
    with tarfile.open(archive, "w:gz") as tar:
        for path in paths:
            tar.add(path, arcname=f"set/{path.relative_to(folder).as_posix()}", recursive=False)
    return archive


@pytest.fixture
def in_workers(monkeypatch):
    """Decode on worker processes however small the set, in chunks of 7 images (many chunks in flight); checks
    that workers were started."""
    monkeypatch.setattr(workers, "IN_PROCESS_MAX", 0)
    monkeypatch.setattr(workers, "CHUNK_IMAGES", 7)
    starts = []
    start = workers.Workers._start
    monkeypatch.setattr(workers.Workers, "_start", lambda self: (starts.append(self.processes), start(self)))
    yield
    assert starts, "no worker process was started"


# --- the same bytes --------------------------------------------------------------------------------------------


@pytest.mark.fast
def test_streamed_bytes_are_the_stacked_images_with_or_without_a_header_pass(tmp_path):
    written = write_mixed_folder(tmp_path / "images")
    expected = expected_files(written, (12, 12))
    # channels auto: a header pass finds colour (and the 16x20 image), then the decode pass.
    auto = fetch(tmp_path, tmp_path / "images", "auto", image_size=12)
    assert idx_files(auto.raw_dir) == expected
    assert auto.counts == {"test": 12, "train": 48}
    n_gray = sum(path.suffix == ".png" and Image.open(path).mode != "RGB" for path, _ in written)
    assert auto.notes == (f"converted {n_gray} of 60 images to RGB (data.channels=auto: the set has colour images)",
                          "resized 1 of 60 images to 12x12 (data.image_size)")
    # channels and size both set: nothing to find out first, one pass.
    fixed = fetch(tmp_path, tmp_path / "images", "fixed", image_size=[12, 12], channels=3)
    assert idx_files(fixed.raw_dir) == expected


def test_worker_processes_give_the_in_process_bytes_from_a_folder_and_a_shuffled_archive(tmp_path, in_workers):
    written = write_mixed_folder(tmp_path / "images")
    expected = expected_files(written, (12, 12))
    assert idx_files(fetch(tmp_path, tmp_path / "images", "folder", image_size=12).raw_dir) == expected
    archive = tar_shuffled(tmp_path / "images", tmp_path / "set.tar.gz")
    assert idx_files(fetch(tmp_path, archive, "tar", image_size=12).raw_dir) == expected


# --- bounded memory --------------------------------------------------------------------------------------------


def _traced_peak(tmp_path: Path, n_per_class: int) -> int:
    """Peak Python/numpy allocations of an in-process fetch of 4 x n_per_class 64x64 RGB JPEGs."""
    folder = tmp_path / f"set{n_per_class}"
    rng = np.random.default_rng(0)
    for label in range(4):
        (folder / f"c{label}").mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.full((64, 64, 3), (label * 60, i % 256, 90), np.uint8)
            pixels += rng.integers(0, 9, (64, 64, 3), np.uint8)
            Image.fromarray(pixels).save(folder / f"c{label}" / f"{i:05d}.jpg", quality=85)
    gc.collect()
    tracemalloc.start()
    try:
        fetch(tmp_path, folder, f"raw{n_per_class}")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_set(tmp_path):
    # 4.9 MB of pixels, then 19.7 MB: were they held (decoded, or stacked), the peak would grow by 15-30 MB.
    small, large = _traced_peak(tmp_path, 100), _traced_peak(tmp_path, 400)
    assert large - small < 1 << 20, (small, large)
    assert large < 4 << 20, large  # one chunk of names, one image, one write buffer (1 MB)


@pytest.mark.fast
def test_worker_pool_keeps_a_bounded_number_of_chunks_in_flight(monkeypatch):
    monkeypatch.setattr(workers, "IN_PROCESS_MAX", 0)
    png = io.BytesIO()
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(png, format="PNG")
    pulled = 0

    def tasks():
        nonlocal pulled
        for _ in range(30):
            pulled += 1
            yield ProbeTask(None, [png.getvalue()] * 3)

    with workers.Workers(processes=2) as pool:
        for done, probed in enumerate(pool.map(probe_chunk, tasks())):
            assert pulled - done <= 2 * workers.IN_FLIGHT_PER_WORKER  # submitted, not yet consumed
            assert probed.heights.tolist() == [5, 5, 5] and probed.widths.tolist() == [7, 7, 7]
        assert pool.started and done == 29


# --- URLs ------------------------------------------------------------------------------------------------------


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:  # quiet; the requests are recorded instead
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # fsspec fetches 32 files at once: socketserver's backlog of 5 drops connections


@pytest.fixture
def http_root(tmp_path):
    """(URL of tmp_path/www served on 127.0.0.1, the paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.fast
def test_a_folder_and_an_archive_at_a_url_give_the_local_bytes_without_a_copy_on_disk(tmp_path, http_root):
    url, requests = http_root
    written = write_mixed_folder(tmp_path / "www" / "images")
    tar_shuffled(tmp_path / "www" / "images", tmp_path / "www" / "set.tar.gz")
    expected = expected_files(written, (12, 12))
    before = {p for p in tmp_path.rglob("*")}

    from_folder = fetch(tmp_path, f"{url}/images/", "raw-folder", image_size=12)
    from_archive = fetch(tmp_path, f"{url}/set.tar.gz", "raw-archive", image_size=12)

    assert idx_files(from_folder.raw_dir) == expected and idx_files(from_archive.raw_dir) == expected
    assert from_archive.source == f"imagefolder:{url}/set.tar.gz"
    outputs = {from_folder.raw_dir, from_archive.raw_dir}
    created = {p for p in tmp_path.rglob("*") if p not in before and p not in outputs and p.parent not in outputs}
    assert created == set()  # nothing but the raw folders: no download of the archive or the images
    # The archive: one streamed GET per pass (listing with headers, decoding); each image: a probe and a decode.
    assert requests.count("/set.tar.gz") == 2
    assert all(requests.count(f"/images/{p.relative_to(tmp_path / 'www' / 'images').as_posix()}") == 2
               for p, _ in written)


@pytest.mark.fast
def test_a_missing_url_and_a_zip_on_a_server_without_ranges_are_named(tmp_path, http_root):
    url, _ = http_root
    for missing in (f"{url}/nothing/", f"{url}/nothing.tar.gz"):
        with pytest.raises(DataError, match=rf"^{re.escape(missing)}: image folder not found"):
            fetch(tmp_path, missing, "raw")
    (tmp_path / "www" / "set.zip").write_bytes(b"PK" * 100)  # http.server answers no range request
    with pytest.raises(DataError, match=rf"^{re.escape(url)}/set\.zip: cannot read the archive \(.*\): check the URL, "
                                        r".*a \.zip needs a server that answers range requests"):
        fetch(tmp_path, f"{url}/set.zip", "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.fast
def test_a_url_is_no_dvc_dep_of_fetch(tmp_path):
    def params(folder: str) -> None:
        (tmp_path / "params.yaml").write_text(f"data:\n  source: imagefolder\n  image_folder: {folder}\n")

    params("https://example.org/set.tar.gz")
    assert source_deps(tmp_path, "fetch") == []
    params("../set.tar.gz")
    assert source_deps(tmp_path, "fetch") == ["${data.image_folder}"]


# --- nothing half-written --------------------------------------------------------------------------------------


@pytest.mark.fast
def test_an_image_failing_late_in_the_decode_pass_leaves_the_previous_raw_folder(tmp_path, in_workers):
    written = write_mixed_folder(tmp_path / "images")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "classes.json").write_text('["x", "y"]')
    # The last image, truncated after its header: the header pass reads it, the decode pass fails on it once
    # the chunks before it have been written.
    last = written[-1][0]
    assert last.suffix == ".png"
    last.write_bytes(last.read_bytes()[:60])
    with pytest.raises(DataError, match=rf"^{re.escape(str(last))}: unreadable image \(.+\): fix or remove the file$"):
        run_fetch(DataConfig(source="imagefolder", image_folder=str(tmp_path / "images"), image_size=12), raw)
    assert [p.name for p in raw.iterdir()] == ["classes.json"] and (raw / "classes.json").read_text() == '["x", "y"]'
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]  # no staging folder left beside it
