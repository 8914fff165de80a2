"""Benchmark: shard formats and loaders for prepared data (issue 23 groundwork), measured on one machine.

Candidates, each writing the same in-memory array and reading it back for one shuffled epoch:

    npy       memory-mapped uint8 .npy shards + a manifest, our own ~40-line reader, torch DataLoader
    npy-sdl   the same shards and reader under torchdata's StatefulDataLoader (resumable mid-epoch)
    wds       WebDataset tar shards (raw bytes per sample), shard shuffle + sample shuffle buffer
    mds       MosaicML `streaming` MDS shards, StreamingDataset + StreamingDataLoader
    hf        Hugging Face `datasets` Arrow shards (save_to_disk), memory-mapped, global shuffle, under
              StatefulDataLoader; each image one fixed-length uint8 list (Sequence(length=12288))
    hf-a3d    the same with the Array3D((64, 64, 3), "uint8") feature (nested lists with offsets)

Data: 50,000 synthetic uint8 64x64x3 images (614 MB), int64 labels = the sample id (so the read order is
checked exactly), shards of ~64 MB (10 per format). Write: images/s from the in-memory array to shards in
the page cache (no fsync). Read: images/s for one shuffled epoch, batch 256, from `iter(loader)` to the last
batch (worker start-up included), page cache warm; each read runs in its own process, and peak RSS and PSS
are the maxima of the sums over that process and its loader workers (sampled every 20 ms; PSS every 200 ms).
RSS counts memory-mapped file pages a process has touched, so PSS (shared pages split between processes)
is given beside it. Each number is the median of 3 runs.

The optional libraries are imported with importlib inside functions: they are not Tuneline dependencies
(tests/test_dependencies.py checks bench/'s import statements) and this script runs from a scratch venv:

    python -m venv /tmp/fmtvenv
    /tmp/fmtvenv/bin/pip install numpy torch==2.14.1 webdataset mosaicml-streaming datasets torchdata psutil
    /tmp/fmtvenv/bin/python bench/bench_formats.py --dir /tmp/fmtbench             # all, 3 runs each
    /tmp/fmtvenv/bin/python bench/bench_formats.py --dir /tmp/fmtbench --formats npy wds --runs 1
    /tmp/fmtvenv/bin/python bench/bench_formats.py sizes --tuneline-python .venv/bin/python  # install size
    /tmp/fmtvenv/bin/python bench/bench_formats.py ragged --dir /tmp/fmtbench       # audio clips, tokens
    /tmp/fmtvenv/bin/python bench/bench_formats.py remote --dir /tmp/fmtbench       # HTTP, after a full run
    rm -rf /tmp/fmtbench /tmp/fmtvenv

Results (2-core x86-64 VM, 24 GiB, no GPU, Python 3.11.7, torch 2.14.1, numpy 2.1.3, webdataset 1.0.2,
mosaicml-streaming 0.13.0, datasets 5.0.1 / pyarrow 26.0.1, torchdata 0.11.0; 2026-12-06; medians of 3;
load average 0.42 at the start and no other job running, checked with ps; the later per-format load
figures the script prints, up to 3.2, are its own processes):

                 write    read img/s       peak RSS / PSS of the tree, MB   disk    resume mid-epoch (checked)
                 img/s    0 wkr   2 wkr    0 workers     2 workers          MB
    npy         481,780  510,936  59,673    591 / 472   1,267 / 498        615    exact: batch offset (seeded plan)
    npy-sdl        (npy) 483,876  65,091    646 / 472   1,269 / 501        615    exact: StatefulDataLoader.state_dict()
    wds           9,231    8,228  10,382    656 / 479   1,283 / 587        794    none (replay and skip)
    mds          23,991    5,140   8,710    861 / 577   1,572 / 600        615    exact: state_dict() (sample_in_epoch)
    hf           24,194  265,002  62,700  1,224 / 1,083 2,569 / 1,125      615    exact: StatefulDataLoader.state_dict()
    hf-a3d        7,016   13,738  16,295  2,023 / 1,882 4,168 / 1,929    1,447    exact: StatefulDataLoader.state_dict()

    RSS of the reading process before the loader starts (imports only): 511-513 MB (npy, wds: torch),
    709 MB (mds), 621 MB (hf). Two forked workers share those pages, so the RSS sum counts them 3 times.
    Same order from the seed in every run: all. Same order with 0 and 2 workers: all but wds.
    Every epoch covered every sample once: all.
    `ragged` (int16 and float32 clips, int32 token sequences of random lengths): exact round trip in npy
    (values + offsets), wds (.npy members), mds (`ndarray:int16` without a shape), hf (Sequence columns).
    `remote` (HTTP server on 127.0.0.1): wds streamed a shard (curl); npy read a row by a range request
    (fsspec); hf `load_dataset("arrow", ..., streaming=True)` streamed; mds refused http:// ("Unsupported
    remote path": s3, gs, oci, azure, hf, sftp, dbfs only). `load_from_disk` of a remote path copies it whole.
    `sizes`, added on top of torch + numpy + psutil (new to Tuneline's .venv): webdataset 3.8 MB (0.5),
    mosaicml-streaming 847 MB, 76 distributions (755 MB, 48; it requires numpy<2.2, transformers<5,
    torchvision, matplotlib, boto3, google-cloud-storage, oci and azure SDKs), datasets 293 MB (281 MB:
    pyarrow, pandas, huggingface-hub, ...), torchdata 3.6 MB (0.4).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

FORMATS = ("npy", "npy-sdl", "wds", "mds", "hf", "hf-a3d")
SHAPE = (64, 64, 3)
SHARD_BYTES = 64 * 2**20  # target shard size
BATCH = 256
# imported before any clock starts: an import is not write or read time (streaming's pulls in transformers)
LIBRARY = {"npy-sdl": "torchdata.stateful_dataloader", "wds": "webdataset", "mds": "streaming", "hf": "datasets",
           "hf-a3d": "datasets"}
SHUFFLE_BUFFER = 5000  # WebDataset's in-memory sample shuffle buffer, per worker (about one shard, 61 MB)


def lib(name: str):
    """Import an optional library (not a Tuneline dependency) by name."""
    return importlib.import_module(name)


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images [n, 64, 64, 3] and labels = sample ids (int64)."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)
    return images, np.arange(n, dtype=np.int64)


def per_shard(n_bytes_per_sample: int) -> int:
    return max(1, SHARD_BYTES // n_bytes_per_sample)


# ---------------------------------------------------------------- writers (in-memory array -> shards)


def write_npy(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    """One `shard-NNNNN.npy` (images) + `.labels.npy` per shard, and manifest.json with the counts."""
    step = per_shard(images[0].nbytes)
    shards = []
    for k, start in enumerate(range(0, len(images), step)):
        np.save(out / f"shard-{k:05d}.npy", images[start:start + step])
        np.save(out / f"shard-{k:05d}.labels.npy", labels[start:start + step])
        shards.append({"name": f"shard-{k:05d}", "count": len(images[start:start + step])})
    (out / "manifest.json").write_text(json.dumps({"shape": list(SHAPE), "dtype": "uint8", "shards": shards}))


def write_wds(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    wds = lib("webdataset")
    with wds.ShardWriter(str(out / "shard-%05d.tar"), maxsize=SHARD_BYTES, maxcount=10**9, verbose=0) as sink:
        for i in range(len(images)):
            sink.write({"__key__": f"{i:08d}", "u8": images[i].tobytes(), "cls": int(labels[i])})


def write_mds(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    streaming = lib("streaming")
    columns = {"image": "ndarray:uint8:" + ",".join(map(str, SHAPE)), "label": "int64"}
    with streaming.MDSWriter(out=str(out), columns=columns, size_limit=SHARD_BYTES, compression=None) as sink:
        for i in range(len(images)):
            sink.write({"image": images[i], "label": int(labels[i])})


def write_hf(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    """Each image a fixed-length uint8 list (Arrow fixed_size_list: no offsets), built zero-copy from the array.

    (`from_dict` on a 2-D numpy array goes through Python lists: ~420 images/s here.)
    """
    datasets, pa = lib("datasets"), lib("pyarrow")
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), images[0].size)
    features = datasets.Features({"image": datasets.Sequence(datasets.Value("uint8"), length=images[0].size),
                                  "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": flat, "label": labels}, features=features)
    ds.save_to_disk(str(out), max_shard_size=SHARD_BYTES)


def write_hf_a3d(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    """The documented image-tensor feature, Array3D: nested lists, so int32 offsets beside every row of pixels."""
    datasets = lib("datasets")
    features = datasets.Features({"image": datasets.Array3D(shape=SHAPE, dtype="uint8"),
                                  "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    ds.save_to_disk(str(out), max_shard_size=SHARD_BYTES)


WRITERS = {"npy": write_npy, "wds": write_wds, "mds": write_mds, "hf": write_hf, "hf-a3d": write_hf_a3d}


def shard_dir(root: Path, fmt: str) -> Path:
    return root / ("npy" if fmt == "npy-sdl" else fmt)


# ---------------------------------------------------------------- our own numpy shard reader


class NpyBatches:
    """Map-style dataset of whole batches over .npy shards: item b is batch b of the epoch's plan.

    The plan (shard order shuffled, samples shuffled within each shard, cut into batches) follows from
    (seed, epoch) alone, so any worker count gives the same order and resuming at batch b is an offset.
    Each worker keeps one shard memory-mapped at a time, so its RSS holds at most one shard's pages.
    """

    def __init__(self, root: Path, seed: int, epoch: int = 0, batch: int = BATCH, start_batch: int = 0):
        manifest = json.loads((root / "manifest.json").read_text())
        self.root, self.names = root, [s["name"] for s in manifest["shards"]]
        rng = np.random.default_rng([seed, epoch])
        plan = []
        for k in rng.permutation(len(self.names)):
            order = rng.permutation(manifest["shards"][k]["count"])
            plan += [(int(k), np.sort(order[i:i + batch])) for i in range(0, len(order), batch)]
        self.plan = plan[start_batch:]
        self._open: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int):
        k, rows = self.plan[b]
        if self._open is None or self._open[0] != k:
            self._open = None  # drop the previous shard's mapping first
            name = self.names[k]
            self._open = (k, np.load(self.root / f"{name}.npy", mmap_mode="r"),
                          np.load(self.root / f"{name}.labels.npy"))
        _, images, labels = self._open
        return torch.from_numpy(images[rows]), torch.from_numpy(labels[rows])


class HfBatches:
    """Map-style view of an Arrow dataset whose item is a list of indices (one batch per fetch)."""

    def __init__(self, root: Path):
        self.root, self.ds = root, None

    def __len__(self) -> int:
        return self._ds().num_rows

    def _ds(self):
        if self.ds is None:  # opened lazily: each worker maps the Arrow files itself
            # "arrow", not "numpy"/"torch": those formatters widen every integer column to int64 (8x the bytes)
            self.ds = lib("datasets").load_from_disk(str(self.root)).with_format("arrow")
        return self.ds

    def __getitem__(self, rows):
        table = self._ds()[list(rows)]  # one Arrow take per batch
        images = table.column("image").combine_chunks()
        images = getattr(images, "storage", images)  # Array3D: an extension type over nested lists
        while hasattr(images, "flatten"):
            images = images.flatten()
        images = images.to_numpy(zero_copy_only=False).reshape(len(rows), *SHAPE)
        return torch.from_numpy(images), torch.from_numpy(table.column("label").to_numpy())


def _wds_decode(sample):
    return np.frombuffer(sample["u8"], np.uint8).reshape(SHAPE), int(sample["cls"])


def _wds_collate(samples):
    return (torch.from_numpy(np.stack([s[0] for s in samples])),
            torch.as_tensor([s[1] for s in samples], dtype=torch.int64))


def _mds_collate(samples):
    return (torch.from_numpy(np.stack([s["image"] for s in samples])),
            torch.as_tensor([s["label"] for s in samples], dtype=torch.int64))


def make_loader(fmt: str, root: Path, workers: int, seed: int, start_batch: int = 0):
    """The loader for one shuffled epoch of `fmt`'s shards in `root`, yielding (uint8 images, int64 ids)."""
    if fmt == "npy":
        return torch.utils.data.DataLoader(NpyBatches(root, seed, start_batch=start_batch), batch_size=None,
                                           num_workers=workers)
    if fmt == "npy-sdl":
        sdl = lib("torchdata.stateful_dataloader")
        return sdl.StatefulDataLoader(NpyBatches(root, seed), batch_size=None, num_workers=workers)
    if fmt == "wds":
        wds = lib("webdataset")
        urls = sorted(str(p) for p in root.glob("shard-*.tar"))
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), detshuffle=True, seed=seed, empty_check=False)
              .shuffle(SHUFFLE_BUFFER, seed=seed).map(_wds_decode).batched(BATCH, collation_fn=_wds_collate))
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    if fmt == "mds":
        streaming = lib("streaming")
        streaming.base.util.clean_stale_shared_memory()
        ds = streaming.StreamingDataset(local=str(root), shuffle=True, shuffle_seed=seed, batch_size=BATCH)
        return streaming.StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=_mds_collate)
    if fmt in ("hf", "hf-a3d"):
        data = HfBatches(root)
        generator = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data, generator=generator),
                                                BATCH, drop_last=False)
        sdl = lib("torchdata.stateful_dataloader")  # map-style + a sampler: resumable through its state
        return sdl.StatefulDataLoader(data, sampler=sampler, batch_size=None, num_workers=workers)
    raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


def read_epoch(fmt: str, root: Path, workers: int, seed: int) -> dict:
    """One shuffled epoch in this process: images/s, the order's hash, and whether every sample came once."""
    if fmt in LIBRARY:
        lib(LIBRARY[fmt])
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    loader = make_loader(fmt, root, workers, seed)
    ids = []
    for images, labels in loader:
        assert images.shape[1:] == SHAPE and images.dtype == torch.uint8
        ids.append(labels.numpy().copy())
    seconds = time.perf_counter() - t0
    order = np.concatenate(ids)
    return {"images_per_s": len(order) / seconds, "seconds": seconds, "n": len(order),
            "covers_once": bool(np.array_equal(np.sort(order), np.arange(len(order)))),
            "order_sha": hashlib.sha256(order.tobytes()).hexdigest()[:12], "rss_before_mb": rss_before / 2**20}


# ---------------------------------------------------------------- resume check (functional, not timed)


def check_resume(fmt: str, root: Path, workers: int, seed: int, stop_after: int) -> str:
    """Stop after `stop_after` batches, rebuild the loader from saved state, and compare with one full epoch."""
    full = np.concatenate([ids.numpy() for _, ids in make_loader(fmt, root, workers, seed)])
    loader = make_loader(fmt, root, workers, seed)
    head = []
    for i, (_, ids) in enumerate(loader):
        head.append(ids.numpy().copy())
        if i + 1 == stop_after:
            break
    if fmt == "npy":  # resume by sample offset: the plan is a function of (seed, epoch)
        resumed = make_loader(fmt, root, workers, seed, start_batch=stop_after)
        how = "batch offset into the seeded plan"
    elif fmt in ("npy-sdl", "hf", "hf-a3d"):
        state = loader.state_dict()
        del loader
        resumed = make_loader(fmt, root, workers, seed)
        resumed.load_state_dict(state)
        how = "StatefulDataLoader.state_dict()"
    elif fmt == "mds":
        state = loader.state_dict()
        del loader
        resumed = make_loader(fmt, root, workers, seed)
        resumed.load_state_dict(state)
        how = f"StreamingDataLoader.state_dict() = {sorted(state)}"
    else:
        return "no mid-epoch state: replay and skip"
    tail = [ids.numpy() for _, ids in resumed]
    joined = np.concatenate(head + tail)
    same = np.array_equal(joined, full)
    return f"{'exact' if same else 'DIFFERS'} ({how}; {len(joined)} of {len(full)} samples)"


# ---------------------------------------------------------------- variable-length records (audio, tokens)


def check_ragged(root: Path) -> dict:
    """Write and read back 100 int16 clips, 100 float32 clips and 100 int32 token sequences of random lengths."""
    rng = np.random.default_rng(1)
    clips = [rng.integers(-2**15, 2**15, rng.integers(800, 16000), dtype=np.int16) for _ in range(100)]
    floats = [rng.standard_normal(rng.integers(800, 16000)).astype(np.float32) for _ in range(100)]
    tokens = [rng.integers(0, 50000, rng.integers(1, 512), dtype=np.int32) for _ in range(100)]
    results = {}
    for fmt in ("npy", "wds", "mds", "hf"):
        out = root / f"ragged-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if fmt == "npy":  # ragged: one flat values array + int64 offsets per column
            for name, rows in (("clip", clips), ("float", floats), ("tokens", tokens)):
                np.save(out / f"{name}.npy", np.concatenate(rows))
                np.save(out / f"{name}.offsets.npy", np.cumsum([0] + [len(r) for r in rows]))
            back = {}
            for name in ("clip", "float", "tokens"):
                values, offsets = np.load(out / f"{name}.npy", mmap_mode="r"), np.load(out / f"{name}.offsets.npy")
                back[name] = [np.asarray(values[a:b]) for a, b in itertools.pairwise(offsets)]
        elif fmt == "wds":  # one .npy member per field per sample
            wds = lib("webdataset")
            with wds.TarWriter(str(out / "shard-00000.tar")) as sink:
                for i in range(100):
                    sink.write({"__key__": f"{i:06d}", "clip.npy": clips[i], "float.npy": floats[i],
                                "tokens.npy": tokens[i]})
            rows = list(wds.WebDataset(str(out / "shard-00000.tar"), shardshuffle=False).decode())
            back = {name: [r[f"{name}.npy"] for r in rows] for name in ("clip", "float", "tokens")}
        elif fmt == "mds":  # 'ndarray:<dtype>' without a shape: variable length, shape stored per sample
            streaming = lib("streaming")
            columns = {"clip": "ndarray:int16", "float": "ndarray:float32", "tokens": "ndarray:int32"}
            with streaming.MDSWriter(out=str(out), columns=columns, compression=None) as sink:
                for i in range(100):
                    sink.write({"clip": clips[i], "float": floats[i], "tokens": tokens[i]})
            streaming.base.util.clean_stale_shared_memory()
            ds = streaming.StreamingDataset(local=str(out), batch_size=1)
            back = {name: [ds[i][name] for i in range(100)] for name in ("clip", "float", "tokens")}
        else:  # Arrow list columns (Sequence); audio files would use the Audio() feature instead
            datasets = lib("datasets")
            features = datasets.Features({"clip": datasets.Sequence(datasets.Value("int16")),
                                          "float": datasets.Sequence(datasets.Value("float32")),
                                          "tokens": datasets.Sequence(datasets.Value("int32"))})
            datasets.Dataset.from_dict({"clip": clips, "float": floats, "tokens": tokens},
                                       features=features).save_to_disk(str(out))
            table = datasets.load_from_disk(str(out)).with_format("arrow")[:]  # "numpy" would widen int16
            back = {name: [row.values.to_numpy() for row in table.column(name).combine_chunks()]
                    for name in ("clip", "float", "tokens")}
        ok = all(np.array_equal(a, b) and a.dtype == np.asarray(b).dtype
                 for name, rows in (("clip", clips), ("float", floats), ("tokens", tokens))
                 for a, b in zip(rows, back[name]))
        results[fmt] = "round trip exact (dtype kept)" if ok else "MISMATCH"
        shutil.rmtree(out)
    return results


# ---------------------------------------------------------------- remote reads over HTTP (a local server)


def check_remote(base: Path) -> dict:
    """Read one shard of each format over HTTP from a server on 127.0.0.1 serving `base`, without copying it whole."""
    import functools
    import http.server

    class RangeHandler(http.server.SimpleHTTPRequestHandler):
        """http.server plus single `Range: bytes=a-b` requests, as object stores and nginx serve them."""

        def log_message(self, *args):
            pass

        def do_GET(self):
            spec = self.headers.get("Range", "")
            path = Path(self.translate_path(self.path))
            if not spec.startswith("bytes=") or not path.is_file():
                return super().do_GET()
            size = path.stat().st_size
            first, _, last = spec[6:].partition("-")
            first, last = int(first or 0), min(int(last) if last else size - 1, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            with open(path, "rb") as f:
                f.seek(first)
                self.wfile.write(f.read(last - first + 1))

    handler = functools.partial(RangeHandler, directory=str(base))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda request, address: None  # a client that stops early (streaming=True) hangs up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    results = {}
    try:
        wds = lib("webdataset")  # http(s) URLs are piped through curl
        n = sum(1 for _ in wds.WebDataset(f"{url}/wds/shard-00000.tar", shardshuffle=False))
        results["wds"] = f"{n} samples streamed from {url}/wds/shard-00000.tar"
        fsspec = lib("fsspec")  # our own reader: byte ranges of a .npy shard (header, then rows)
        with fsspec.open(f"{url}/npy/shard-00000.npy", "rb") as f:
            header = f.read(128)
            offset = header.index(b"\n") + 1
            f.seek(offset + 1234 * int(np.prod(SHAPE)))
            row = np.frombuffer(f.read(int(np.prod(SHAPE))), np.uint8).reshape(SHAPE)
        local = np.load(base / "npy" / "shard-00000.npy", mmap_mode="r")[1234]
        results["npy"] = f"row 1234 by HTTP range request: {'equal' if np.array_equal(row, local) else 'DIFFERS'}"
        datasets = lib("datasets")  # Arrow files through fsspec, streaming=True: an IterableDataset
        ds = datasets.load_dataset("arrow", data_files=[f"{url}/hf/data-00000-of-00010.arrow"], split="train",
                                   streaming=True)
        first = next(iter(ds))
        results["hf"] = f"streaming=True over HTTP: first label {first['label']}, {len(first['image'])} bytes"
        streaming = lib("streaming")
        try:
            streaming.StreamingDataset(remote=f"{url}/mds", local=str(base / "mds-cache"), batch_size=1)[0]
            results["mds"] = "http remote read"
        except ValueError as error:  # no http(s) downloader: s3, gs, oci, azure, hf, sftp, dbfs, volumes only
            results["mds"] = f"http remote refused: {type(error).__name__}: {str(error)[:120]}"
    finally:
        server.shutdown()
        shutil.rmtree(base / "mds-cache", ignore_errors=True)
    return results


# ---------------------------------------------------------------- installed size of each library's dependencies


def install_sizes(tuneline_python: str | None, base=("torch", "numpy", "psutil")) -> dict:
    """MB on disk of the distributions each library adds on top of `base` (its dependency closure, no extras),
    and of those not already installed in Tuneline's environment (`tuneline_python`'s distributions)."""
    metadata = importlib.import_module("importlib.metadata")
    markers = lib("packaging.requirements")

    def norm(name):
        return name.lower().replace("_", "-").replace(".", "-")

    def closure(roots):
        seen, todo = set(), [norm(r) for r in roots]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for req in metadata.distribution(name).requires or []:
                parsed = markers.Requirement(req)
                if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                    try:
                        metadata.distribution(parsed.name)
                    except metadata.PackageNotFoundError:
                        continue
                    todo.append(norm(parsed.name))
        return seen

    def size_mb(names):
        total = 0
        for name in names:
            for f in metadata.distribution(name).files or []:
                path = f.locate()
                total += path.stat().st_size if path.is_file() else 0
        return total / 1e6

    have = closure(base)
    tuneline = set()
    if tuneline_python:
        listing = subprocess.run([tuneline_python, "-c", ("import importlib.metadata as m; "
                                  "print('\\n'.join(d.metadata['Name'] for d in m.distributions()))")],
                                 capture_output=True, text=True, check=True).stdout
        tuneline = {norm(line) for line in listing.split()}
    out = {"base (torch, numpy, psutil)": {"mb": round(size_mb(have)), "adds": sorted(have)}}
    for name in ("webdataset", "mosaicml-streaming", "datasets", "torchdata"):
        adds = closure([name]) - have
        out[name] = {"mb": round(size_mb(adds), 1), "n": len(adds), "adds": sorted(adds)}
        if tuneline_python:
            new = adds - tuneline
            out[name] |= {"new_to_tuneline_mb": round(size_mb(new), 1), "new_to_tuneline": sorted(new)}
    return out


# ---------------------------------------------------------------- the harness


def peak_tree_memory(proc: subprocess.Popen) -> dict:
    """Sample RSS (and PSS) summed over `proc` and its descendants until it exits; return the peaks in MB."""
    top = psutil.Process(proc.pid)
    peak = {"rss": 0, "pss": 0}
    tick = 0
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
            peak["rss"] = max(peak["rss"], sum(p.memory_info().rss for p in tree))
            if tick % 10 == 0:
                peak["pss"] = max(peak["pss"], sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:  # a worker exited between listing and reading
            pass
        tick += 1
        time.sleep(0.02)
    return {"rss_mb": peak["rss"] / 2**20, "pss_mb": peak["pss"] / 2**20}


def run_read(fmt: str, base: Path, workers: int, seed: int) -> dict:
    """One read in a child process (shards under base/<format>), its tree's peak memory watched from here."""
    cmd = [sys.executable, __file__, "read", "--format", fmt, "--dir", str(base), "--workers", str(workers),
           "--seed", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    memory = {}
    watcher = threading.Thread(target=lambda: memory.update(peak_tree_memory(proc)))
    watcher.start()
    stdout, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"read {fmt} workers={workers}: exited {proc.returncode}")
    return {**json.loads(stdout.strip().splitlines()[-1]), **memory}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "read", "sizes", "ragged", "remote"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fmtbench"))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--format", choices=FORMATS)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tuneline-python", help="sizes: also count what this interpreter's environment lacks")
    parser.add_argument("--skip-write", action="store_true", help="reuse the shards already in --dir")
    args = parser.parse_args()

    if args.mode == "read":
        print(json.dumps(read_epoch(args.format, shard_dir(args.dir, args.format), args.workers[0], args.seed)))
        return
    if args.mode == "sizes":
        print(json.dumps(install_sizes(args.tuneline_python), indent=1))
        return
    if args.mode == "remote":
        print(json.dumps(check_remote(args.dir), indent=1))
        return
    if args.mode == "ragged":
        print(json.dumps(check_ragged(args.dir), indent=1))
        return

    print(f"load average {os.getloadavg()}; {psutil.cpu_count()} CPUs; "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB", flush=True)
    images, labels = make_data(args.n)
    summary = {}
    for fmt in args.formats:
        root = shard_dir(args.dir, fmt)
        print(f"{fmt}: load average {os.getloadavg()[0]:.2f}", flush=True)
        writes = []
        if fmt in LIBRARY:
            lib(LIBRARY[fmt])
        if fmt in WRITERS and not args.skip_write:
            for _ in range(args.runs):
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                t0 = time.perf_counter()
                WRITERS[fmt](images, labels, root)
                writes.append(len(images) / (time.perf_counter() - t0))
        files = [p for p in root.rglob("*") if p.is_file()]
        row = {"write_img_s": statistics.median(writes) if writes else None,
               "shards": len([p for p in files if p.stat().st_size > 2**20]),
               "disk_mb": sum(p.stat().st_size for p in files) / 1e6}
        for workers in args.workers:
            reads = [run_read(fmt, args.dir, workers, args.seed) for _ in range(args.runs)]
            row[f"w{workers}"] = {"read_img_s": median(reads, "images_per_s"), "rss_mb": median(reads, "rss_mb"),
                                  "pss_mb": median(reads, "pss_mb"), "rss_before_mb": median(reads, "rss_before_mb"),
                                  "all_runs_img_s": [round(r["images_per_s"]) for r in reads],
                                  "same_order_each_run": len({r["order_sha"] for r in reads}) == 1,
                                  "order_sha": reads[0]["order_sha"],
                                  "covers_once": all(r["covers_once"] for r in reads)}
        orders = {row[f"w{w}"]["order_sha"] for w in args.workers}
        row["same_order_any_workers"] = len(orders) == 1
        row["resume"] = check_resume(fmt, root, max(args.workers), args.seed, stop_after=args.n // BATCH // 3)
        summary[fmt] = row
        print(fmt, json.dumps(row), flush=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
