"""The training curves as a picture (PNG, drawn with Pillow: matplotlib is not a dependency).

Two panels from the per-epoch history (paths.history): loss (train and val) and accuracy (val, and train where
the history has it), each against the epoch, so a reader of the run summary sees at a glance whether the model
was still learning, had converged or was over-fitting.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tuneline.core.atomic import staged_file

PANEL = (380, 260)          # one panel's plot area, in pixels (width, height)
MARGIN = (58, 34, 16, 44)   # pixels around a plot area (title, tick labels, axis name): left, top, right, bottom
COLOURS = {"train": (230, 97, 1), "val": (33, 102, 172)}  # orange, blue (readable for red-green colour blindness)
# (title, columns, legend corner): losses fall and accuracies rise, so these corners stay clear of the lines
PANELS = (("loss", ("train_loss", "val_loss"), "top"), ("accuracy", ("train_accuracy", "val_accuracy"), "bottom"))
INSET = 10                  # pixels between the frame and the first/last epoch, so end points are not cut


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering low..high."""
    span = high - low or abs(high) or 1.0
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


def _panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, epochs: list[int],
           series: dict[str, list[float]], corner: str, font, small) -> None:
    left, top = origin[0] + MARGIN[0], origin[1] + MARGIN[1]
    width, height = PANEL
    values = [v for line in series.values() for v in line]
    ticks = _ticks(min(values), max(values))
    y_low, y_high = ticks[0], ticks[-1] if ticks[-1] > ticks[0] else ticks[0] + 1
    x_low, x_high = epochs[0], max(epochs[-1], epochs[0] + 1)

    def point(epoch: float, value: float) -> tuple[float, float]:
        return (left + INSET + (epoch - x_low) / (x_high - x_low) * (width - 2 * INSET),
                top + height - (value - y_low) / (y_high - y_low) * height)

    draw.text((left + width / 2, origin[1] + 6), title, fill="black", font=font, anchor="mt")
    for tick in ticks:
        y = point(x_low, tick)[1]
        draw.line((left, y, left + width, y), fill=(225, 225, 225))
        draw.text((left - 6, y), _label(tick), fill="black", font=small, anchor="rm")
    step = max(1, math.ceil(len(epochs) / 10))  # at most about ten epoch labels
    for epoch in epochs[::step]:
        x = point(epoch, y_low)[0]
        draw.line((x, top + height, x, top + height + 4), fill="black")
        draw.text((x, top + height + 6), str(epoch), fill="black", font=small, anchor="mt")
    draw.rectangle((left, top, left + width, top + height), outline="black")
    draw.text((left + width / 2, top + height + 22), "epoch", fill="black", font=small, anchor="mt")
    for k, (name, line) in enumerate(series.items()):
        colour = COLOURS[name.split("_")[0]]
        points = [point(e, v) for e, v in zip(epochs, line)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        legend_y = top + 10 + 16 * k if corner == "top" else top + height - 10 - 16 * (len(series) - 1 - k)
        legend_x = left + width - 120
        draw.line((legend_x, legend_y, legend_x + 20, legend_y), fill=colour, width=2)
        draw.text((legend_x + 26, legend_y), name.replace("_", " "), fill="black", font=small, anchor="lm")


def render_curves_png(history: list[dict], path: Path) -> Path:
    """Draw loss and accuracy per epoch of `history` (paths.history's rows) to `path` atomically; returns the path."""
    epochs = [int(row["epoch"]) for row in history]
    panels = []
    for title, columns, corner in PANELS:
        series = {c: [float(row[c]) for row in history] for c in columns if history and c in history[0]}
        if series:
            panels.append((title, series, corner))
    cell = (MARGIN[0] + PANEL[0] + MARGIN[2], MARGIN[1] + PANEL[1] + MARGIN[3])
    image = Image.new("RGB", (cell[0] * max(len(panels), 1), cell[1]), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    if not epochs:
        draw.text((cell[0] / 2, cell[1] / 2), "no epochs in the training history", fill="black", font=font, anchor="mm")
    for k, (title, series, corner) in enumerate(panels if epochs else []):
        _panel(draw, (k * cell[0], 0), title, epochs, series, corner, font, small)
    with staged_file(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
