"""Reading and writing the IDX format MNIST ships in, with validation that names the file and the fault."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from tasks.errors import InputError

IMAGES_MAGIC = 2051  # ubyte, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 2049  # ubyte, 1 dimension (count)


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
    """IDX bytes -> uint8 array ([N, rows, cols] for images, [N] for labels), checking magic and size."""
    kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
    header_size = 16 if expected_magic == IMAGES_MAGIC else 8
    if len(data) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_size}): re-fetch the file")
    (magic,) = struct.unpack(">i", data[:4])
    if magic != expected_magic:
        raise DataError(
            f"{path}: wrong magic number {magic} (expected {expected_magic} for IDX {kind}): "
            "is this the right file?"
        )
    if expected_magic == IMAGES_MAGIC:
        count, rows, cols = struct.unpack(">iii", data[4:16])
        shape: tuple[int, ...] = (count, rows, cols)
    else:
        (count,) = struct.unpack(">i", data[4:8])
        shape = (count,)
    expected = header_size + int(np.prod(shape))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{path}: {state} (expected {expected} bytes, got {len(data)}): re-fetch the file")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an uncompressed IDX file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing: run `tuneline stage fetch` (or `dvc repro`) first") from None
    return parse_idx(data, path, expected_magic)


def encode_idx(array: np.ndarray) -> bytes:
    """uint8 images [N, rows, cols] or labels [N] -> IDX bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        header = struct.pack(">iiii", IMAGES_MAGIC, *array.shape)
    elif array.ndim == 1:
        header = struct.pack(">ii", LABELS_MAGIC, array.shape[0])
    else:
        raise ValueError(f"IDX encoding supports 1-D labels or 3-D images, got shape {array.shape}")
    return header + array.tobytes()


def check_pair(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path, n_classes: int) -> None:
    """Images and labels must agree in count and labels must name a known class."""
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels but {images_path.name} holds {images.shape[0]} images: "
            "the two files come from different sets; re-fetch both"
        )
    if labels.size and int(labels.max()) >= n_classes:
        bad = int(np.argmax(labels >= n_classes))
        raise DataError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range 0..{n_classes - 1}: "
            "the file is corrupt; re-fetch it"
        )
