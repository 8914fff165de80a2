"""One image's bytes -> uint8 pixels, and the two tasks fetch's worker processes run over a chunk of images.

`probe_chunk` reads what the whole set's shape depends on (size, and gray or colour) from the image
headers, without decoding pixels (a palette image is decoded: whether it is gray depends on the colours
its pixels use). `decode_chunk` decodes, conforms each image to the set's channels and size, and writes
its row straight into the IDX file at the row's offset, so pixels never travel between processes and a
worker holds one image at a time (and up to WRITE_BYTES of adjacent rows not yet written). Both read the images themselves when given names (a folder: in
parallel, without the main process in the way) or take the bytes the main process read (an archive).

Workers import this module only (numpy and PIL): it must stay light, as every worker pays for its imports.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np

GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
# Modes that decode as colour whatever the pixels: anything else (a palette) is decoded to tell.
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "PA", "La"})
PREFIX_BYTES = 64 * 1024  # what a probe reads first: PNG's header is in the first 33 bytes, JPEG's usually in 64 KiB
WRITE_BYTES = 1 << 20  # adjacent rows gathered into one write


class Unreadable(Exception):
    """An image PIL cannot read; the message is the reason, in the words today's errors use."""


def _reason(exc: BaseException) -> str:
    from PIL import UnidentifiedImageError

    # PIL's own message for an unknown format names an in-memory buffer, not the file: say it plainly.
    return "not an image PIL can identify" if isinstance(exc, UnidentifiedImageError) else str(exc)


def decode(data: bytes) -> np.ndarray:
    """One image as it is: uint8 [H, W] (gray) or [H, W, 3] (RGB). Raises Unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in GRAY_MODES:
                if img.mode.startswith("I") or img.mode == "F":  # 16-bit / float gray: scale to 8 bits, not clip
                    values = np.asarray(img, dtype=np.float64)
                    top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
                    return np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
                return np.asarray(img.convert("L"), dtype=np.uint8)
            # RGB (every JPEG photo) as decoded: a convert() would copy each image once more (a third of the time).
            rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
            if img.mode == "P" and (rgb == rgb[..., :1]).all():  # a gray palette is a gray image
                return np.ascontiguousarray(rgb[..., 0])
            return rgb
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise Unreadable(_reason(exc)) from None


def probe(data: bytes, complete: bool) -> tuple[int, int, bool] | None:
    """(height, width, is colour) as decode() will give them, from the header where that tells; None when
    `data` (a first part of the file, `complete` False) is not enough. Raises Unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.mode in GRAY_MODES or img.mode in COLOUR_MODES:
                return height, width, img.mode not in GRAY_MODES
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        if complete:
            raise Unreadable(_reason(exc)) from None
        return None
    if not complete:
        return None
    image = decode(data)
    return image.shape[0], image.shape[1], image.ndim == 3


def conform(image: np.ndarray, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, bool, bool]:
    """`image` at `channels` and `size` (height, width); and whether its colour, its size changed."""
    from PIL import Image

    recoloured = resized = False
    if (image.ndim == 3) != (channels == 3):
        recoloured = True
        image = np.asarray(Image.fromarray(image).convert("RGB" if channels == 3 else "L"))
    if image.shape[:2] != size:
        resized = True
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return image, recoloured, resized


# --- reading a chunk's images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    index: int     # in the chunk
    reason: str
    access: bool = False  # the file could not be fetched (a URL): not the image's fault


def _read_local(root: str, name: str, size: int = -1) -> bytes:
    with open(os.path.join(root, name), "rb") as handle:
        return handle.read(size)


def _contents(root: str | None, items: list, prefix: int | None = None):
    """(bytes or the exception reading them, complete) per item: items are bytes, or names below `root`."""
    if root is None:
        for data in items:
            yield data, True
        return
    from tuneline.tasks.data import remote

    if remote.is_url(root):
        for start in range(0, len(items), remote.READ_BATCH):
            batch = items[start:start + remote.READ_BATCH]
            for data in remote.read_files(root, batch, prefix):
                # A server that ignores the range sends the whole file, longer than asked for.
                yield data, prefix is None or (isinstance(data, bytes) and len(data) != prefix)
        return
    for name in items:
        try:
            data = _read_local(root, name, prefix or -1)
        except OSError as exc:
            yield exc, True
            continue
        yield data, prefix is None or len(data) < prefix


def _read_whole(root: str | None, name) -> bytes | BaseException:
    if root is None:
        return name
    from tuneline.tasks.data import remote

    if remote.is_url(root):
        return remote.read_files(root, [name])[0]
    try:
        return _read_local(root, name)
    except OSError as exc:
        return exc


def _failure(index: int, root: str | None, exc: BaseException) -> Failure:
    # A local file that cannot be read is an unreadable image, as it always was; a URL may only be unreachable.
    remote_read = root is not None and "://" in root
    return Failure(index, str(exc) or type(exc).__name__, access=remote_read)


# --- the two tasks ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTask:
    root: str | None   # a folder (path or URL) the items are names below; None: the items are the bytes
    items: list


@dataclass
class Probed:
    heights: np.ndarray
    widths: np.ndarray
    colour: np.ndarray
    failures: list[Failure] = field(default_factory=list)  # every image that could not be probed


def probe_chunk(task: ProbeTask) -> Probed:
    n = len(task.items)
    out = Probed(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool))
    prefix = None if task.root is None else PREFIX_BYTES
    for i, (data, complete) in enumerate(_contents(task.root, task.items, prefix)):
        try:
            if isinstance(data, BaseException):
                raise data
            found = probe(data, complete)
            if found is None:  # the header lies past the first bytes read: read the whole file
                data = _read_whole(task.root, task.items[i])
                if isinstance(data, BaseException):
                    raise data
                found = probe(data, True)
        except Unreadable as exc:
            out.failures.append(Failure(i, str(exc)))
            continue
        except Exception as exc:  # reading failed: OSError, or a URL's errors
            out.failures.append(_failure(i, task.root, exc))
            continue
        out.heights[i], out.widths[i], out.colour[i] = found
    return out


@dataclass(frozen=True)
class DecodeTask:
    root: str | None
    items: list
    outputs: tuple[str, ...]  # the IDX image files
    output: np.ndarray        # per item: which of them
    offsets: np.ndarray       # per item: its row's byte offset there
    channels: int
    size: tuple[int, int]


@dataclass
class Decoded:
    written: int = 0
    recoloured: int = 0
    resized: int = 0
    heights: np.ndarray | None = None  # as decoded, for the main process to check against the probe
    widths: np.ndarray | None = None
    colour: np.ndarray | None = None
    failure: Failure | None = None      # the first image that failed: the chunk stops there


class _Rows:
    """Rows written at their offsets; adjacent ones gathered into one write of up to WRITE_BYTES."""

    def __init__(self, outputs: tuple[str, ...]):
        self.outputs, self.files, self.buffer, self.at = outputs, {}, bytearray(), (-1, -1)

    def put(self, output: int, offset: int, row: bytes) -> None:
        if self.at != (output, offset) or len(self.buffer) >= WRITE_BYTES:
            self.flush()
            self.at = (output, offset)
        self.buffer += row
        self.at = (output, offset + len(row))

    def flush(self) -> None:
        if self.buffer:
            output, end = self.at
            handle = self.files.get(output)
            if handle is None:
                handle = self.files[output] = open(self.outputs[output], "r+b", buffering=0)
            handle.seek(end - len(self.buffer))
            handle.write(self.buffer)
            self.buffer = bytearray()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for handle in self.files.values():
                handle.close()


def decode_chunk(task: DecodeTask) -> Decoded:
    n = len(task.items)
    out = Decoded(heights=np.zeros(n, np.int32), widths=np.zeros(n, np.int32), colour=np.zeros(n, bool))
    rows = _Rows(task.outputs)
    try:
        for i, (data, _) in enumerate(_contents(task.root, task.items)):
            if isinstance(data, BaseException):
                out.failure = _failure(i, task.root, data)
                break
            try:
                image = decode(data)
            except Unreadable as exc:
                out.failure = Failure(i, str(exc))
                break
            out.heights[i], out.widths[i], out.colour[i] = image.shape[0], image.shape[1], image.ndim == 3
            image, recoloured, resized = conform(image, task.channels, task.size)
            out.recoloured += recoloured
            out.resized += resized
            rows.put(int(task.output[i]), int(task.offsets[i]), np.ascontiguousarray(image).tobytes())
            out.written += 1
    finally:
        rows.close()
    return out
