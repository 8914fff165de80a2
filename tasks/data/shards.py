"""The prepared-data format: per split, shards of bounded size (`.npy` columns) and one manifest.

One format for every modality. A shard holds `count` records as two or three plain `.npy` files:

    <split>/<index>.x.npy          the records: [count, *shape] when every record has one shape (images),
                                   or every record's values end to end when the first axis varies (audio
                                   clips, token sequences), with
    <split>/<index>.x_offsets.npy  int64 [count + 1]: record i is values[offsets[i]:offsets[i + 1]]
    <split>/<index>.y.npy          int64 labels [count]

and the manifest (`manifest.json`, written by prepare) lists, per split, the shards in order with their counts
and the sha256 of each file, beside the record layout (`record`: dtype and shape, `null` for the varying axis),
the input spec, the counts per class and the seed. `.npy`, not torch.save: identical data gives identical bytes
(DVC sees an unchanged output) and any numpy reads it. Why this and not WebDataset, MDS or Arrow: measured in
docs/data.md ("Shard format").

Reading is lazy: a shard is memory-mapped when a batch needs it and at most `OPEN_SHARDS` stay mapped per
process, so a reader's memory does not grow with the data. Each file's checksum is checked the first time a
process reads it; a corrupt or truncated shard is a DataError naming the file.

A folder prepared before shards (`<split>-images.npy` + `<split>-labels.npy`, manifest without `format`) is read
as one shard per split, checked against the checksums its manifest recorded: never misread.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneline.core.registry_reader import sha256_file  # one streaming sha256 for every file Tuneline checks
from tuneline.tasks.data.idx import DataError

FORMAT = "tuneline-shards/1"
OPEN_SHARDS = 2  # mapped per process: a batch spans at most two consecutive shards
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) whose checksum this process checked


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BUFFER = 1 << 20


def large_buffers_straight_to_the_os() -> None:
    """Serve allocations of LARGE_BUFFER and more with their own mappings, returned when freed. glibc raises its
    threshold for that to the size of the last large buffer freed (up to 32 MB), after which a stream of
    batch-sized buffers is carved from the heap, which fragments and grows with every batch: a streamed
    evaluation of 57,000 64x64 images crept from 0.6 to 0.93 GB, and stays at 0.76 GB with a fixed threshold.
    Process-wide and costly where large tensors come and go at a high rate (training: every activation then
    pays a fresh mapping), so only stages that read and score call it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


@dataclass(frozen=True)
class RecordLayout:
    """What one record is: its dtype and shape; `None` as the first axis of `shape` means it varies."""

    dtype: str
    shape: tuple[int | None, ...]

    @property
    def ragged(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> RecordLayout:
        return cls(dtype=str(data["dtype"]), shape=tuple(data["shape"]))


@dataclass(frozen=True)
class Shard:
    """One shard of a split: its record count and, per column (x, x_offsets, y), file name and sha256."""

    count: int
    files: dict[str, str]   # column -> path relative to the prepared folder
    sha256: dict[str, str]  # column -> sha256 of that file

    def to_dict(self) -> dict:
        return {"count": self.count, "files": self.files, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict) -> Shard:
        return cls(count=int(data["count"]), files=dict(data["files"]), sha256=dict(data["sha256"]))


def write_shard(root: Path, split: str, index: int, x: np.ndarray | Sequence[np.ndarray], y: np.ndarray,
                layout: RecordLayout) -> Shard:
    """Write one shard of `split` under `root` (the staging folder) and return its manifest entry.

    `x` is an array [n, *layout.shape] for fixed-shape records, or a sequence of n arrays whose first axis varies
    (the rest of each record's shape must match layout.shape[1:]).
    """
    y = np.ascontiguousarray(np.asarray(y, dtype=np.int64))
    columns: dict[str, np.ndarray] = {}
    if layout.ragged:
        records = [np.asarray(r, dtype=layout.dtype) for r in x]
        for r in records:
            if tuple(r.shape[1:]) != tuple(layout.shape[1:]):
                raise DataError(f"{split} shard {index}: a record of shape {list(r.shape)} does not fit "
                                f"{layout.to_dict()['shape']}")
        lengths = np.fromiter((len(r) for r in records), dtype=np.int64, count=len(records))
        columns["x"] = (np.concatenate(records) if records else
                        np.empty((0, *layout.shape[1:]), dtype=layout.dtype))
        columns["x_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    else:
        x = np.asarray(x)
        if x.dtype != np.dtype(layout.dtype) or tuple(x.shape[1:]) != tuple(layout.shape):
            raise DataError(f"{split} shard {index}: records {x.dtype} {list(x.shape[1:])}, the layout says "
                            f"{layout.dtype} {list(layout.shape)}")
        columns["x"] = np.ascontiguousarray(x)
    n = len(columns["x_offsets"]) - 1 if layout.ragged else len(columns["x"])
    if n != len(y):
        raise DataError(f"{split} shard {index}: {n} records but {len(y)} labels: they must pair up")
    columns["y"] = y
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    files, digests = {}, {}
    for column, array in columns.items():
        relative = f"{split}/{index:05d}.{column}.npy"
        np.save(Path(root) / relative, array, allow_pickle=False)
        files[column], digests[column] = relative, sha256_file(Path(root) / relative)
    return Shard(count=len(y), files=files, sha256=digests)


def split_entry(shards: list[Shard]) -> dict:
    """The manifest entry of one split: its record count and its shards in order."""
    return {"count": sum(s.count for s in shards), "shards": [s.to_dict() for s in shards]}


def shard_plan(count: int, record_bytes: int, shard_mb: float) -> list[tuple[int, int]]:
    """(start, stop) of each shard of a `count`-record split: as few shards as keep each under `shard_mb`, of
    near-equal size (so DDP ranks and loader workers get even shares)."""
    if count == 0:
        return [(0, 0)]
    per_shard = max(1, int(shard_mb * 1e6 // max(record_bytes, 1)))
    n_shards = -(-count // per_shard)
    bounds = np.linspace(0, count, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class SplitShards:
    """A prepared split as shards: counts, lazily mapped shard arrays, sequential batches, the whole split."""

    def __init__(self, prepared_dir: Path, split: str, manifest: dict):
        self.root, self.split = Path(prepared_dir), split
        if manifest.get("format") == FORMAT:
            entry = manifest["splits"].get(split)
            if entry is None:
                raise DataError(f"{self.root / 'manifest.json'}: no split {split!r}: run `tuneline stage prepare`")
            self.shards = [Shard.from_dict(s) for s in entry["shards"]]
            self.layout = RecordLayout.from_dict(manifest["record"])
        elif "format" in manifest:
            raise DataError(f"{self.root / 'manifest.json'}: prepared-data format {manifest['format']!r} is not "
                            f"{FORMAT!r} (a newer Tuneline wrote it?): run `tuneline stage prepare` again")
        else:  # prepared before shards: each split is one whole-split pair of .npy files
            files = {"x": f"{split}-images.npy", "y": f"{split}-labels.npy"}
            recorded = manifest.get("files", {})
            count = manifest.get("counts", {}).get(split)
            if count is None or not all(Path(f).name in recorded for f in files.values()):
                raise DataError(f"{self.root / 'manifest.json'}: a prepared folder of an older Tuneline without "
                                f"checksums for {split}: run `tuneline stage prepare` again")
            self.shards = [Shard(count=int(count), files=files, sha256={c: recorded[f] for c, f in files.items()})]
            self.layout = RecordLayout("uint8", tuple(manifest["image_shape"]))
        self.count = sum(s.count for s in self.shards)
        self.starts = np.concatenate([[0], np.cumsum([s.count for s in self.shards])]).astype(np.int64)
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._maps: dict[int, list] = {}  # each open shard's mmap objects, to hand their pages back (release)

    def __len__(self) -> int:
        return self.count

    @property
    def record_bytes(self) -> int:
        """Bytes of one fixed-shape record (of the mean record for ragged ones) plus its label."""
        if not self.layout.ragged:
            return int(np.prod(self.layout.shape)) * np.dtype(self.layout.dtype).itemsize + 8
        size = sum((self.root / s.files["x"]).stat().st_size for s in self.shards)
        return size // max(self.count, 1) + 16

    @property
    def nbytes(self) -> int:
        return self.record_bytes * self.count

    def verify(self) -> None:
        """Check every file of the split against its manifest checksum (once per process and file version)."""
        for index, info in enumerate(self.shards):
            for column in info.files:
                self._check(index, column)

    def _check(self, shard: int, column: str) -> Path:
        info = self.shards[shard]
        path = self.root / info.files[column]
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(f"{path}: missing shard file: run `tuneline stage prepare` (or `dvc pull`/`dvc repro`) "
                            "again") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _VERIFIED:
            digest = sha256_file(path)
            if digest != info.sha256[column]:
                raise DataError(f"{path}: corrupt shard (sha256 {digest[:12]}…, the manifest says "
                                f"{info.sha256[column][:12]}…): run `tuneline stage prepare` (or `dvc checkout`) again")
            _VERIFIED.add(key)
        return path

    def _column(self, shard: int, column: str) -> np.ndarray:
        path = self._check(shard, column)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            self._maps.setdefault(shard, []).append(getattr(array, "_mmap", None))
            return array
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: unreadable shard ({exc}): run `tuneline stage prepare` again") from None

    def shard(self, index: int) -> dict[str, np.ndarray]:
        """Shard `index`'s columns, memory-mapped (at most OPEN_SHARDS stay mapped in this process)."""
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        columns = {column: self._column(index, column) for column in self.shards[index].files}
        x = columns["x"]
        if not self.layout.ragged and x.ndim == len(self.layout.shape):  # an old [N, H, W] gray split
            columns["x"] = x.reshape(len(x), *self.layout.shape)
        n = len(columns["x_offsets"]) - 1 if self.layout.ragged else len(columns["x"])
        if n != self.shards[index].count or len(columns["y"]) != n:
            raise DataError(f"{self.root / self.shards[index].files['x']}: {n} records, the manifest says "
                            f"{self.shards[index].count}: run `tuneline stage prepare` again")
        self._open[index] = columns
        while len(self._open) > OPEN_SHARDS:
            evicted, _ = self._open.popitem(last=False)  # unmapped once nothing else holds it
            self._maps.pop(evicted, None)
        return columns

    def release(self, index: int) -> None:
        """Hand shard `index`'s touched pages back to the page cache: a mapped page counts in this process's
        memory until then, so a reader gathering across a 64 MB shard would otherwise hold all 64 MB."""
        for mapping in self._maps.get(index, []):
            if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED)

    def gather(self, index: int, rows: np.ndarray | slice) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Records `rows` (indices or a slice) of shard `index`, copied out of the mapping: (x, y)."""
        columns = self.shard(index)
        y = np.array(columns["y"][rows])
        if self.layout.ragged:
            values, offsets = columns["x"], columns["x_offsets"]
            picked = range(len(offsets) - 1)[rows] if isinstance(rows, slice) else rows
            x = [np.array(values[offsets[r]:offsets[r + 1]]) for r in picked]
        else:
            x = np.array(columns["x"][rows])
        self.release(index)
        return x, y

    def read(self, start: int, stop: int) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Records start..stop of the split (in stored order), across shard boundaries."""
        xs, ys = [], []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for index in range(max(first, 0), len(self.shards)):
            lo, hi = max(start, self.starts[index]), min(stop, self.starts[index + 1])
            if lo >= hi:
                if self.starts[index] >= stop:
                    break
                continue
            x, y = self.gather(index, slice(int(lo - self.starts[index]), int(hi - self.starts[index])))
            xs.append(x)
            ys.append(y)
        if self.layout.ragged:
            return [r for x in xs for r in x], (np.concatenate(ys) if ys else np.empty(0, np.int64))
        if not xs:
            return np.empty((0, *self.layout.shape), self.layout.dtype), np.empty(0, np.int64)
        return (xs[0], ys[0]) if len(xs) == 1 else (np.concatenate(xs), np.concatenate(ys))

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The split (its first `limit` records) in stored order, `batch_size` records at a time."""
        stop = self.count if limit is None else min(limit, self.count)
        for start in range(0, stop, batch_size):
            yield self.read(start, min(start + batch_size, stop))

    def labels(self) -> np.ndarray:
        """Every label of the split (8 bytes a record: small beside the records)."""
        return np.concatenate([np.asarray(self.shard(i)["y"]) for i in range(len(self.shards))]) if self.shards \
            else np.empty(0, np.int64)

    def close(self) -> None:
        self._open.clear()
        self._maps.clear()


def gather_rows(shards: SplitShards, rows: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """Records `rows` (indices into the split's stored order) in that order: one gather per shard they touch
    (a list of arrays for ragged records)."""
    which = np.searchsorted(shards.starts, rows, side="right") - 1
    ragged = shards.layout.ragged
    x = [None] * len(rows) if ragged else np.empty((len(rows), *shards.layout.shape), dtype=shards.layout.dtype)
    y = np.empty(len(rows), dtype=np.int64)
    for shard in np.unique(which):
        at = np.flatnonzero(which == shard)
        local = rows[at] - shards.starts[shard]
        by_offset = np.argsort(local, kind="stable")  # ascending offsets: forward reads through the mapping
        xs, ys = shards.gather(int(shard), local[by_offset])
        y[at[by_offset]] = ys
        if ragged:
            for position, record in zip(at[by_offset], xs):
                x[position] = record
        else:
            x[at[by_offset]] = xs
    return x, y


def first_records(prepared_dir: Path, split: str, n: int) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """The first n records of a prepared split and their labels, numpy only (benchmarks, serving checks)."""
    manifest_path = Path(prepared_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: missing: run `tuneline stage prepare` (or `dvc repro`) first")
    split_shards = SplitShards(Path(prepared_dir), split, json.loads(manifest_path.read_text()))
    return split_shards.read(0, min(n, split_shards.count))


def data_files(manifest: dict) -> dict[str, str]:
    """Every prepared file of a manifest and its sha256 (an old whole-split folder's `files`)."""
    if manifest.get("format") == FORMAT:
        return {name: digest for entry in manifest["splits"].values() for shard in entry["shards"]
                for name, digest in zip(shard["files"].values(), shard["sha256"].values())}
    return dict(manifest.get("files", {}))


def data_fingerprint(manifest: dict) -> str:
    """One digest of every prepared file's checksum: what a cache keys its data by."""
    return hashlib.sha256(json.dumps(data_files(manifest), sort_keys=True).encode()).hexdigest()
