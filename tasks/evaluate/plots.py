"""The confusion matrix as a picture (PNG, drawn with Pillow: matplotlib is not a dependency).

Cells are shaded by the share of their row (so a weak class stands out however many images it has) and
carry the raw count; the diagonal is blue, errors red.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from tuneline.core.atomic import staged_file

CELL = 44             # pixels per cell
MARGIN = 70           # room for the axis titles and class names, in pixels
MAX_GRID = 1760       # pixels the cells may span (40 classes at full size): many classes get smaller cells
LABELLED_CELL = 24    # below this cell size counts and class names would not fit: the picture is shading only


def _shade(share: float, correct: bool) -> tuple[int, int, int]:
    # White at 0 towards a saturated blue (diagonal) or red (errors) at 1; errors saturate at 20% of the
    # row, because any visible error share matters and would otherwise be a faint pink.
    strength = min(1.0, share if correct else share * 5)
    target = (33, 102, 172) if correct else (202, 0, 32)
    return tuple(round(255 + (t - 255) * strength) for t in target)


def render_confusion_png(confusion: torch.Tensor, classes: list[str], path: Path, title: str = "") -> Path:
    """Draw `confusion` (rows: actual, columns: predicted) to `path` atomically; returns the path."""
    n = len(classes)
    counts = confusion.tolist()
    cell = max(1, min(CELL, MAX_GRID // max(n, 1)))  # 300 classes: 5-pixel cells, not a 13,000-pixel picture
    labelled = cell >= LABELLED_CELL
    size = MARGIN + n * cell + 10
    font = ImageFont.load_default(size=12)
    small = ImageFont.load_default(size=10)
    title = title or "confusion matrix (rows: actual, columns: predicted)"
    width = max(size, MARGIN + round(font.getlength(title)) + 10)  # a few classes: wide enough for the whole title
    image = Image.new("RGB", (width, size), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 4), title, fill="black", font=font)
    for i, row in enumerate(counts):
        total = max(sum(row), 1)
        for j, count in enumerate(row):
            x, y = MARGIN + j * cell, MARGIN + i * cell
            fill = _shade(count / total, i == j)
            if not labelled:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill)
                continue
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(200, 200, 200))
            dark = sum(fill) < 400
            draw.text((x + cell / 2, y + cell / 2), str(count), fill="white" if dark else "black", font=small,
                      anchor="mm")
    for k, name in enumerate(classes if labelled else []):
        draw.text((MARGIN + k * cell + cell / 2, MARGIN - 6), name, fill="black", font=font, anchor="mb")
        draw.text((MARGIN - 6, MARGIN + k * cell + cell / 2), name, fill="black", font=font, anchor="rm")
    draw.text((MARGIN + n * cell / 2, MARGIN - 24), "predicted", fill="black", font=font, anchor="mb")
    draw.text((6, MARGIN - 24), "actual", fill="black", font=font, anchor="lb")
    with staged_file(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
