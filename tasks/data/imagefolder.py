"""The `imagefolder` source: class sub-folders of PNG/JPEG images (or an archive of them) -> uint8 arrays.

Layout, as torchvision's ImageFolder reads it: `<class>/<image>` at the top, or the same under split
folders `train/`, `val/`, `test/` (then every split must hold every class). Class names are the folder
names, sorted; labels are their positions. Images keep their colour and size: gray stays [H, W], colour
becomes RGB [H, W, 3] (alpha and palettes are flattened); `data.channels` and `data.image_size` say what to
do when the images disagree, and every conversion is logged with its count. Anything that is not an image
is skipped and logged, never silently.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.archive import SPLIT_NAMES, Entry
from tuneline.tasks.data.idx import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
EXAMPLES = 3  # names quoted in a log line or an error


@dataclass(frozen=True)
class Decoded:
    """An image folder as arrays: per split (`all` when the folder has no split folders), and what was changed."""

    classes: list[str]
    sets: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 [N, H, W] or [N, H, W, 3], int64 labels)
    notes: list[str]                                 # one line per conversion or skip, also logged


def _examples(names: list[str]) -> str:
    return ", ".join(names[:EXAMPLES]) + (", …" if len(names) > EXAMPLES else "")


def _layout(entries: list[Entry], where: str) -> tuple[dict[str, dict[str, list[Entry]]], list[str]]:
    """{split: {class: [image entries]}} and the skipped files; split is `all` without split folders."""
    top_dirs = {e.parts[0] for e in entries if len(e.parts) > 1 or e.is_dir}
    split_layout = bool(top_dirs) and top_dirs <= set(SPLIT_NAMES)
    if split_layout and "train" not in top_dirs:
        raise DataError(f"{where}: split folders {sorted(top_dirs)} but no train/: add train/<class>/… images")
    depth = 2 if split_layout else 1  # parts before the class name, plus one
    tree: dict[str, dict[str, list[Entry]]] = {}
    skipped = []
    for entry in entries:
        split = entry.parts[0] if split_layout else "all"
        if len(entry.parts) < depth + (0 if entry.is_dir else 1):
            if not entry.is_dir:
                skipped.append(entry.shown)  # a file beside the class folders
            continue
        classes = tree.setdefault(split, {})
        images = classes.setdefault(entry.parts[depth - 1], [])
        if entry.is_dir:
            continue
        if entry.parts[-1].lower().endswith(IMAGE_SUFFIXES):
            images.append(entry)
        else:
            skipped.append(entry.shown)
    return tree, skipped


def _class_names(tree: dict[str, dict[str, list[Entry]]], where: str) -> list[str]:
    classes = sorted({name for split in tree.values() for name in split})
    if len(classes) < 2:
        raise DataError(f"{where}: found {len(classes)} class sub-folder(s), need at least 2 (one per class)")
    for split, members in sorted(tree.items()):
        prefix = "" if split == "all" else f"{split}/"
        for name in classes:
            if name not in members:
                raise DataError(f"{where}: class {name!r} is missing from split {prefix}: every split needs a "
                                f"{prefix}{name}/ folder of images")
            if not members[name]:
                raise DataError(f"{where}/{prefix}{name}: empty class folder (no .png/.jpg/.jpeg files): "
                                "add images or remove it")
    return classes


def _decode(entry: Entry) -> np.ndarray:
    """One image as it is: uint8 [H, W] (gray) or [H, W, 3] (RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(entry.read())) as img:
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
        # PIL's own message for an unknown format names an in-memory buffer, not the file: say it plainly.
        reason = "not an image PIL can identify" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"{entry.shown}: unreadable image ({reason}): fix or remove the file") from None


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


def _conform(images: list[np.ndarray], channels: int, size: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """Stack images at `channels` and `size` (height, width); returns the stack, how many changed colour, size."""
    from PIL import Image

    recoloured = resized = 0
    out = np.empty((len(images), *size, *((3,) if channels == 3 else ())), dtype=np.uint8)
    for i, image in enumerate(images):
        if (image.ndim == 3) != (channels == 3):
            recoloured += 1
            image = np.asarray(Image.fromarray(image).convert("RGB" if channels == 3 else "L"))
        if image.shape[:2] != size:
            resized += 1
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        out[i] = image
    return out, recoloured, resized


def load_image_folder(entries: list[Entry], cfg: DataConfig, where: str) -> Decoded:
    """Decode and check every image of the tree; a DataError names the first problem, nothing is written."""
    tree, skipped = _layout(entries, where)
    classes = _class_names(tree, where)
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} non-image file(s) (not .png/.jpg/.jpeg in a class folder): "
                     f"{_examples(skipped)}")
    order = [(split, label, entry) for split in sorted(tree) for label, name in enumerate(classes)
             for entry in tree[split][name]]
    decoded = [_decode(entry) for _, _, entry in order]
    sizes = Counter(image.shape[:2] for image in decoded)
    shown_of_size = {}
    for (_, _, entry), image in zip(order, decoded):
        shown_of_size.setdefault(image.shape[:2], entry.shown)
    n_colour = sum(image.ndim == 3 for image in decoded)
    channels = (3 if n_colour else 1) if cfg.channels == "auto" else cfg.channels
    size = _target_size(cfg, sizes, shown_of_size, where)
    sets = {}
    recoloured = resized = 0
    for split in sorted(tree):
        index = [i for i, (s, _, _) in enumerate(order) if s == split]
        images, n_colour_changed, n_resized = _conform([decoded[i] for i in index], channels, size)
        recoloured, resized = recoloured + n_colour_changed, resized + n_resized
        sets[split] = (images, np.asarray([order[i][1] for i in index], dtype=np.int64))
    if recoloured:
        into, why = ("RGB", f"data.channels={cfg.channels}: the set has colour images") if channels == 3 else \
                    ("gray", "data.channels=1")
        notes.append(f"converted {recoloured} of {len(decoded)} images to {into} ({why})")
    if resized:
        notes.append(f"resized {resized} of {len(decoded)} images to {size[0]}x{size[1]} (data.image_size)")
    for note in notes:
        log.info("fetch: %s: %s", where, note)
    return Decoded(classes=classes, sets=sets, notes=notes)
