"""The `imagefolder` source: class sub-folders of PNG/JPEG images (or an archive of them) -> IDX files, streamed.

Layout, as torchvision's ImageFolder reads it: `<class>/<image>` at the top, or the same under split
folders `train/`, `val/`, `test/` (then every split must hold every class). Class names are the folder
names, sorted; labels are their positions. Images keep their colour and size: gray stays [H, W], colour
becomes RGB [H, W, 3] (alpha and palettes are flattened); `data.channels` and `data.image_size` say what to
do when the images disagree, and every conversion is logged with its count. Anything that is not an image
is skipped and logged, never silently.

Memory does not grow with the set: the images are never all held, decoded or not. The tree is listed by
name (tasks/data/archive.py); a first pass reads image headers only, for what the set's shape depends on
(its size, and whether any image is colour), and is skipped when data.channels and data.image_size both
say it (a tar, which can only be streamed, is listed and probed in one pass); a second pass decodes each
image, conforms it, and writes its row into the IDX file at its place, so the bytes are those the images
would give stacked in order (sorted split, then class, then path) whatever order they are read in.
Passes run on worker processes, a few chunks of images in flight at a time (tasks/data/workers.py).
An unreadable image is named as the first one met: in image order for a folder (and a tar's headers),
in archive order for an archive's other reads.
"""

from __future__ import annotations

import logging
import struct
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.archive import SPLIT_NAMES, Listing, Member, Picked, list_folder, members, scan_archive, \
    source_kind
from tuneline.tasks.data.decode import DecodeTask, Failure, ProbeTask, decode_chunk, probe_chunk
from tuneline.tasks.data.idx import COLOR_IMAGES_MAGIC, IMAGES_MAGIC, DataError, encode_idx
from tuneline.tasks.data import workers
from tuneline.tasks.data.workers import Workers

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXAMPLES = 3  # names quoted in a log line or an error


@dataclass(frozen=True)
class Fetched:
    """What an image folder gave: its classes, images per split (`all` without split folders), what changed."""

    classes: list[str]
    counts: dict[str, int]
    notes: list[str]  # one line per conversion or skip, also logged


@dataclass
class Plan:
    """Where every image goes: position p of the image order is listing file `files[p]`, label `labels[p]`."""

    classes: list[str]
    files: np.ndarray                    # int64, per position
    labels: np.ndarray                   # int64, per position
    splits: dict[str, tuple[int, int]]   # split -> [start, stop) of the positions, splits in sorted order
    skipped: int                         # files that are not images in a class folder
    skipped_examples: list[str]


@dataclass
class Shapes:
    """Per position: height, width and colour as the first pass read them."""

    heights: np.ndarray
    widths: np.ndarray
    colour: np.ndarray


def _examples(names: list[str], count: int) -> str:
    return ", ".join(names[:EXAMPLES]) + (", …" if count > EXAMPLES else "")


# --- the tree --------------------------------------------------------------------------------------------------


def _class_names(tree: dict[str, dict[str, int]], where: str) -> list[str]:
    classes = sorted({name for split in tree.values() for name in split})
    if len(classes) < 2:
        raise DataError(f"{where}: found {len(classes)} class sub-folder(s), need at least 2 (one per class)")
    for split, members_ in sorted(tree.items()):
        prefix = "" if split == "all" else f"{split}/"
        for name in classes:
            if name not in members_:
                raise DataError(f"{where}: class {name!r} is missing from split {prefix}: every split needs a "
                                f"{prefix}{name}/ folder of images")
            if not members_[name]:
                raise DataError(f"{where}/{prefix}{name}: empty class folder (no .png/.jpg/.jpeg files): "
                                "add images or remove it")
    return classes


def plan_layout(listing: Listing, where: str) -> Plan:
    """The images of the tree, their classes and splits; a DataError names the first layout problem."""
    top_dirs = {parts[0] for parts in map(listing.parts, listing.dirs) if parts}
    for name in listing.files:
        rest = name.split("/", listing.strip)[-1]
        if "/" in rest:
            top_dirs.add(rest.split("/", 1)[0])
    split_layout = bool(top_dirs) and top_dirs <= set(SPLIT_NAMES)
    if split_layout and "train" not in top_dirs:
        raise DataError(f"{where}: split folders {sorted(top_dirs)} but no train/: add train/<class>/… images")
    depth = 2 if split_layout else 1  # parts before the class name, plus one
    tree: dict[str, dict[str, int]] = {}  # split -> class -> images
    for parts in map(listing.parts, listing.dirs):
        if len(parts) >= depth:
            tree.setdefault(parts[0] if split_layout else "all", {}).setdefault(parts[depth - 1], 0)
    images = array("q")
    runs: list[list] = []  # [split, class, images] of consecutive images: one per class and split when sorted
    skipped, examples = 0, []
    for index, name in enumerate(listing.files):
        parts = listing.parts(name)
        if len(parts) >= depth + 1:
            split, cls = parts[0] if split_layout else "all", parts[depth - 1]
            counts = tree.setdefault(split, {})
            counts.setdefault(cls, 0)
            if parts[-1].lower().endswith(IMAGE_SUFFIXES):
                counts[cls] += 1
                images.append(index)
                if runs and runs[-1][0] == split and runs[-1][1] == cls:
                    runs[-1][2] += 1
                else:
                    runs.append([split, cls, 1])
                continue
        skipped += 1  # a file beside the class folders, or not an image
        if len(examples) <= EXAMPLES:
            examples.append(listing.shown(index))
    classes = _class_names(tree, where)
    split_names = sorted(tree)
    label = {name: i for i, name in enumerate(classes)}
    keys = np.repeat(np.array([split_names.index(s) * len(classes) + label[c] for s, c, _ in runs], np.int64),
                     np.array([n for _, _, n in runs], np.int64))
    order = np.argsort(keys, kind="stable")  # split, then class, then path; already so for a sorted listing
    keys = keys[order]
    bounds = np.searchsorted(keys // len(classes), np.arange(len(split_names) + 1))
    return Plan(classes=classes, files=np.frombuffer(images, np.int64)[order], labels=keys % len(classes),
                splits={s: (int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(split_names)},
                skipped=skipped, skipped_examples=examples)


# --- the passes ------------------------------------------------------------------------------------------------

Chunk = tuple[np.ndarray, "str | None", list]  # positions, the folder the items are names in (None: bytes), items


def _changed(where: str) -> DataError:
    return DataError(f"{where}: changed while fetch read it (an image appeared, went or was replaced between its "
                     "two passes): run fetch again once it is complete")


def _chunks(listing: Listing, plan: Plan, source: str) -> Iterator[Chunk]:
    """The images, chunk by chunk: a folder's by name in image order (the workers read them), an archive's
    with their bytes, read in one pass in archive order (positions then say where each goes)."""
    n = len(plan.files)
    if listing.kind == "folder":
        for start in range(0, n, workers.CHUNK_IMAGES):
            positions = np.arange(start, min(start + workers.CHUNK_IMAGES, n))
            yield positions, source, [listing.files[i] for i in plan.files[positions]]
        return
    wanted = listing.ordinals[plan.files]
    by_ordinal = np.argsort(wanted, kind="stable")
    wanted = wanted[by_ordinal]
    met = 0
    positions: list[int] = []
    items: list[bytes] = []
    size = 0
    for ordinal, name, _, data in members(source, Picked(wanted)):
        if data is None:
            continue
        if met >= n or wanted[met] != ordinal or listing.files[plan.files[by_ordinal[met]]] != name:
            raise _changed(source)
        position = int(by_ordinal[met])
        met += 1
        positions.append(position)
        items.append(data)
        size += len(data)
        if len(items) >= workers.CHUNK_IMAGES or size >= workers.CHUNK_BYTES:
            yield np.array(positions, np.int64), None, items
            positions, items, size = [], [], 0
    if met != n:
        raise _changed(source)
    if items:
        yield np.array(positions, np.int64), None, items


def _failure_error(shown: str, failure: Failure) -> DataError:
    if failure.access:
        return DataError(f"{shown}: cannot read ({failure.reason}): check the URL, the network and your credentials, "
                         "then run fetch again")
    return DataError(f"{shown}: unreadable image ({failure.reason}): fix or remove the file")


def _shown(listing: Listing, plan: Plan, position: int) -> str:
    return listing.shown(int(plan.files[position]))


def _probe_pass(listing: Listing, plan: Plan, source: str, pool: Workers) -> Shapes:
    n = len(plan.files)
    shapes = Shapes(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool))
    sent: deque[np.ndarray] = deque()

    def tasks() -> Iterator[ProbeTask]:
        for positions, root, items in _chunks(listing, plan, source):
            sent.append(positions)
            yield ProbeTask(root, items)

    for probed in pool.map(probe_chunk, tasks(), total=n):
        positions = sent.popleft()
        if probed.failures:  # the first met: a folder's are met in image order
            failure = probed.failures[0]
            raise _failure_error(_shown(listing, plan, positions[failure.index]), failure)
        shapes.heights[positions], shapes.widths[positions], shapes.colour[positions] = \
            probed.heights, probed.widths, probed.colour
    return shapes


class _TarProbes:
    """Headers read while a tar is listed (one pass less over a stream that cannot seek): every member named
    like an image, keyed by its ordinal, as the layout is not known yet."""

    def __init__(self) -> None:
        self.ordinals, self.heights, self.widths, self.colour = array("q"), array("i"), array("i"), array("b")
        self.failures: dict[int, Failure] = {}

    def scan(self, source: str, pool: Workers) -> Listing:
        sent: deque[list[int]] = deque()
        listing: list[Listing] = []

        def stream() -> Iterator[Member]:
            listing.append((yield from scan_archive(source, lambda _, name: name.lower().endswith(IMAGE_SUFFIXES))))

        def tasks() -> Iterator[ProbeTask]:
            ordinals, items, size = [], [], 0
            for ordinal, _, _, data in stream():
                ordinals.append(ordinal)
                items.append(data)
                size += len(data)
                if len(items) >= workers.CHUNK_IMAGES or size >= workers.CHUNK_BYTES:
                    sent.append(ordinals)
                    yield ProbeTask(None, items)
                    ordinals, items, size = [], [], 0
            if items:
                sent.append(ordinals)
                yield ProbeTask(None, items)

        for probed in pool.map(probe_chunk, tasks()):
            ordinals = sent.popleft()
            self.ordinals.extend(ordinals)
            self.heights.extend(probed.heights.tolist())
            self.widths.extend(probed.widths.tolist())
            self.colour.extend(probed.colour.astype(np.int8).tolist())
            self.failures.update({ordinals[f.index]: f for f in probed.failures})
        return listing[0]

    def shapes(self, listing: Listing, plan: Plan) -> Shapes:
        """Per position; a DataError names the first image (in image order) that could not be read."""
        wanted = listing.ordinals[plan.files]
        if self.failures:
            failed = np.isin(wanted, np.fromiter(self.failures, np.int64))
            if failed.any():
                position = int(np.argmax(failed))
                raise _failure_error(_shown(listing, plan, position), self.failures[int(wanted[position])])
        probed = np.frombuffer(self.ordinals, np.int64) if self.ordinals else np.empty(0, np.int64)
        rows = np.searchsorted(probed, wanted)  # every image is named like one, so it was probed
        if not len(probed) or not np.array_equal(probed[np.minimum(rows, len(probed) - 1)], wanted):
            raise RuntimeError(f"{listing.where}: an image was listed but not probed")
        return Shapes(np.asarray(self.heights, np.int32)[rows], np.asarray(self.widths, np.int32)[rows],
                      np.asarray(self.colour, bool)[rows])


def _target_size(cfg: DataConfig, sizes: Counter, shown_of_size: dict, where: str) -> tuple[int, int]:
    if cfg.image_size is not None:
        side = cfg.image_size
        return (side, side) if isinstance(side, int) else tuple(side)
    (common, _), = sizes.most_common(1)
    odd = sum(n for size, n in sizes.items() if size != common)
    if odd:
        size, shown = next((s, p) for s, p in shown_of_size.items() if s != common)
        raise DataError(f"{where}: {odd} images are not {common[0]}x{common[1]} (e.g. {shown}: {size[0]}x{size[1]}); "
                        "set data.image_size to resize them all")
    return common


def _decide(cfg: DataConfig, shapes: Shapes | None, listing: Listing, plan: Plan, where: str) -> tuple[int, tuple]:
    """The set's channels and size (height, width), as the settings and the images say."""
    if shapes is None:  # both set: no image is needed to know
        return cfg.channels, _target_size(cfg, Counter(), {}, where)
    channels = (3 if shapes.colour.any() else 1) if cfg.channels == "auto" else cfg.channels
    sizes: Counter = Counter()
    shown_of_size = {}
    if cfg.image_size is None:
        packed = shapes.heights.astype(np.int64) << 32 | shapes.widths.astype(np.int64)
        unique, first, counts = np.unique(packed, return_index=True, return_counts=True)
        for at in np.argsort(first):  # in order of first appearance, as counting image by image gives
            size = (int(unique[at] >> 32), int(unique[at] & 0xFFFFFFFF))
            sizes[size] = int(counts[at])
            shown_of_size[size] = _shown(listing, plan, int(first[at]))
    return channels, _target_size(cfg, sizes, shown_of_size, where)


def _write_images(staging: Path, listing: Listing, plan: Plan, source: str, channels: int, size: tuple[int, int],
                  shapes: Shapes | None, pool: Workers) -> tuple[int, int]:
    """Every image into `[<split>-]images-idx{3,4}-ubyte`; returns how many changed colour, size."""
    shape = (*size, 3) if channels == 3 else tuple(size)
    row = int(np.prod(shape))
    outputs, starts, heads = [], [], []
    for split, (start, stop) in plan.splits.items():
        path = staging / f"{'' if split == 'all' else split + '-'}images-idx{1 + len(shape)}-ubyte"
        header = struct.pack(f">{2 + len(shape)}i", COLOR_IMAGES_MAGIC if channels == 3 else IMAGES_MAGIC,
                             stop - start, *shape)
        with open(path, "wb") as handle:  # the header now, the rows at their offsets as they come
            handle.write(header)
            handle.truncate(len(header) + (stop - start) * row)
        outputs.append(str(path))
        starts.append(start)
        heads.append(len(header))
    starts_, heads_ = np.array(starts, np.int64), np.array(heads, np.int64)
    sent: deque[np.ndarray] = deque()

    def tasks() -> Iterator[DecodeTask]:
        for positions, root, items in _chunks(listing, plan, source):
            output = np.searchsorted(starts_, positions, side="right") - 1
            sent.append(positions)
            yield DecodeTask(root, items, tuple(outputs), output, heads_[output] + (positions - starts_[output]) * row,
                             channels, tuple(size))

    written = recoloured = resized = 0
    for decoded in pool.map(decode_chunk, tasks(), total=len(plan.files)):
        positions = sent.popleft()
        if decoded.failure is not None:
            raise _failure_error(_shown(listing, plan, positions[decoded.failure.index]), decoded.failure)
        if shapes is not None:  # what the set's shape was decided on must be what was decoded
            same = ((decoded.heights == shapes.heights[positions]) & (decoded.widths == shapes.widths[positions])
                    & (decoded.colour == shapes.colour[positions]))
            if not same.all():
                raise _changed(_shown(listing, plan, positions[int(np.argmin(same))]))
        written += decoded.written
        recoloured += decoded.recoloured
        resized += decoded.resized
    if written != len(plan.files):  # never a hole of zeros in the output
        raise RuntimeError(f"fetch wrote {written} of {len(plan.files)} images")
    return recoloured, resized


def fetch_image_folder(source: str, cfg: DataConfig, staging: Path) -> Fetched:
    """Decode and check every image of the folder or archive at `source` (a path or URL) into IDX files in
    `staging`; a DataError names the first problem (and leaves what was written there to the caller)."""
    kind = source_kind(source)
    probe = cfg.channels == "auto" or cfg.image_size is None
    with Workers() as pool:
        tar_probes = _TarProbes() if kind == "tar" and probe else None
        if kind == "folder":
            listing = list_folder(source)
        elif tar_probes is not None:
            listing = tar_probes.scan(source, pool)
        else:  # a zip lists from its directory; a tar whose shape is known is listed in a pass of names
            listing = _listing_of(scan_archive(source, lambda *_: False))
        plan = plan_layout(listing, source)
        notes = []
        if plan.skipped:
            notes.append(f"skipped {plan.skipped} non-image file(s) (not .png/.jpg/.jpeg in a class folder): "
                         f"{_examples(plan.skipped_examples, plan.skipped)}")
        shapes = None
        if probe:
            shapes = tar_probes.shapes(listing, plan) if tar_probes else _probe_pass(listing, plan, source, pool)
        channels, size = _decide(cfg, shapes, listing, plan, source)
        recoloured, resized = _write_images(staging, listing, plan, source, channels, size, shapes, pool)
    for split, (start, stop) in plan.splits.items():
        # Labels past 255 are written as 16- or 32-bit IDX integers (tasks/data/idx.py).
        (staging / f"{'' if split == 'all' else split + '-'}labels-idx1-ubyte").write_bytes(
            encode_idx(plan.labels[start:stop]))
    total = len(plan.files)
    if recoloured:
        into, why = ("RGB", f"data.channels={cfg.channels}: the set has colour images") if channels == 3 else \
                    ("gray", "data.channels=1")
        notes.append(f"converted {recoloured} of {total} images to {into} ({why})")
    if resized:
        notes.append(f"resized {resized} of {total} images to {size[0]}x{size[1]} (data.image_size)")
    for note in notes:
        log.info("fetch: %s: %s", source, note)
    return Fetched(plan.classes, {split: stop - start for split, (start, stop) in plan.splits.items()}, notes)


def _listing_of(scan: Iterator) -> Listing:
    """Run a scan that reads no member's bytes to its end, for the listing it returns."""
    while True:
        try:
            next(scan)
        except StopIteration as done:
            return done.value
