"""Reading and writing the IDX format MNIST ships in, with validation that names the file and the fault."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from tuneline.core.errors import InputError

# An IDX magic number is 0x00 0x00 <element type> <number of dimensions>; the data is big-endian.
IMAGES_MAGIC = 0x0803  # 2051: ubyte, 3 dimensions (count, rows, cols): MNIST's, and any gray image set
COLOR_IMAGES_MAGIC = 0x0804  # 2052: ubyte, 4 dimensions (count, rows, cols, channels): colour images as decoded
IMAGE_MAGICS = (IMAGES_MAGIC, COLOR_IMAGES_MAGIC)
LABELS_MAGIC = 0x0801  # 2049: ubyte, 1 dimension (count): MNIST's, and any label set of up to 256 classes
# More classes than a byte holds: the same layout with wider elements (IDX types 0x0B short, 0x0C int).
LABEL_DTYPES = {LABELS_MAGIC: np.dtype(np.uint8), 0x0B01: np.dtype(">i2"), 0x0C01: np.dtype(">i4")}


class DataError(InputError, ValueError):
    """Input data is unusable; the message names the file, the problem and what to do."""


def read_gzip(path: Path) -> bytes:
    """Decompress a .gz file, turning truncation and corruption into a DataError naming the file."""
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except EOFError:
        raise DataError(f"{path}: truncated gzip (the stream ends early): re-fetch the file") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{path}: corrupt gzip ({exc}): re-fetch the file") from None


def parse_idx(data: bytes, path: Path, expected_magic: int) -> np.ndarray:
    """IDX bytes -> array ([N, rows, cols] or [N, rows, cols, channels] uint8 images, or [N] labels), checking
    magic and size.

    `expected_magic` names the kind (IMAGES_MAGIC, which also accepts the 4-D COLOR_IMAGES_MAGIC, or
    LABELS_MAGIC). Labels may be ubyte, short or int (LABEL_DTYPES); they come back as uint8, int16 or int32 in
    native byte order.
    """
    kind = "images" if expected_magic in IMAGE_MAGICS else "labels"
    if len(data) < 8:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {16 if kind == 'images' else 8}): "
                        "re-fetch the file")
    (magic,) = struct.unpack(">i", data[:4])
    dtypes = {m: np.dtype(np.uint8) for m in IMAGE_MAGICS} if kind == "images" else LABEL_DTYPES
    if magic not in dtypes:
        raise DataError(
            f"{path}: wrong magic number {magic} (expected {expected_magic} for IDX {kind}): "
            "is this the right file?"
        )
    dtype = dtypes[magic]
    ndim = magic & 0xFF  # the magic's low byte is the number of dimensions, each a big-endian int32 after it
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_size}): re-fetch the file")
    shape: tuple[int, ...] = struct.unpack(f">{ndim}i", data[4:header_size])
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{path}: {state} (expected {expected} bytes, got {len(data)}): re-fetch the file")
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an uncompressed IDX file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing: run `tuneline stage fetch` (or `dvc repro`) first") from None
    return parse_idx(data, path, expected_magic)


def label_magic(labels: np.ndarray) -> int:
    """The narrowest IDX label type that holds `labels`: ubyte up to 255 (MNIST's bytes), then short, then int."""
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    for magic, dtype in LABEL_DTYPES.items():
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return magic
    raise ValueError(f"labels {low}..{high} do not fit in a 32-bit IDX label file")


def encode_idx(array: np.ndarray) -> bytes:
    """uint8 images [N, rows, cols] (gray) or [N, rows, cols, channels] (colour), or integer labels [N] -> IDX
    bytes (labels in the narrowest type that fits)."""
    array = np.asarray(array)
    if array.ndim in (3, 4):
        if array.dtype != np.uint8:
            raise ValueError(f"IDX images must be uint8, got {array.dtype}")
        magic = IMAGES_MAGIC if array.ndim == 3 else COLOR_IMAGES_MAGIC
        return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + np.ascontiguousarray(array).tobytes()
    if array.ndim == 1:
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"IDX labels must be integers, got {array.dtype}")
        magic = label_magic(array)
        body = np.ascontiguousarray(array, dtype=LABEL_DTYPES[magic]).tobytes()
        return struct.pack(">ii", magic, array.shape[0]) + body
    raise ValueError(f"IDX encoding supports 1-D labels or 3-D / 4-D images, got shape {array.shape}")


def check_pair(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path, n_classes: int) -> None:
    """Images and labels must agree in count and labels must name a known class."""
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels but {images_path.name} holds {images.shape[0]} images: "
            "the two files come from different sets; re-fetch both"
        )
    out_of_range = (labels < 0) | (labels >= n_classes)
    if out_of_range.any():
        bad = int(np.argmax(out_of_range))
        raise DataError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range 0..{n_classes - 1}: "
            "the file is corrupt; re-fetch it"
        )


def map_idx_images(path: Path) -> np.ndarray:
    """An uncompressed IDX image file as a read-only memory map ([N, rows, cols] or [N, rows, cols, channels]):
    prepare gathers a shard at a time from it, so the pixels are never all in memory at once."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: truncated IDX header ({len(head)} bytes, need 16): re-fetch the file")
            (magic,) = struct.unpack(">i", head)
            if magic not in IMAGE_MAGICS:
                raise DataError(f"{path}: wrong magic number {magic} (expected {IMAGES_MAGIC} for IDX images): "
                                "is this the right file?")
            ndim = magic & 0xFF
            dims = handle.read(4 * ndim)
    except FileNotFoundError:
        raise DataError(f"{path}: missing: run `tuneline stage fetch` (or `dvc repro`) first") from None
    header_size = 4 + 4 * ndim
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({4 + len(dims)} bytes, need {header_size}): re-fetch the file")
    shape = struct.unpack(f">{ndim}i", dims)
    expected, size = header_size + int(np.prod(shape)), path.stat().st_size
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        raise DataError(f"{path}: {state} (expected {expected} bytes, got {size}): re-fetch the file")
    if shape[0] == 0:
        return np.empty(shape, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=header_size, shape=shape)


def read_idx_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (ascending) of an uncompressed IDX image file, read with one pread per run of consecutive rows:
    no memory map, so the process holds only what it returns (a mapping would also hold the neighbouring pages
    the kernel maps around every row it touches: up to 64 KB a row)."""
    shape = map_idx_images(path).shape  # checks the header and the size
    row_bytes = int(np.prod(shape[1:]))
    header_size = 4 + 4 * len(shape)
    out = np.empty((len(rows), *shape[1:]), dtype=np.uint8)
    flat = out.reshape(len(rows), row_bytes)
    if not len(rows):
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one read each
    with open(path, "rb", buffering=0) as handle:
        fd = handle.fileno()
        for start, stop in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            view = memoryview(flat[start:stop]).cast("B")
            offset, done = header_size + int(rows[start]) * row_bytes, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise DataError(f"{path}: truncated while reading row {int(rows[start])}: re-fetch the file")
                done += got
    return out
