"""A tiny prepared data set of any input spec (default RGB 3x12x12, 4 classes), as `tuneline stage prepare` writes it.

Class k is a bright square in quadrant k of the image on noise, tinted per class: learnable in a few steps by
any network, so tests can check that training moves, not just that it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tuneline.tasks.data.prepare import measure_spec
from tuneline.tasks.data.shards import FORMAT, RecordLayout, split_entry, write_shard


def synthetic_images(n: int, shape: tuple[int, int, int] = (3, 12, 12), n_classes: int = 4,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    channels, height, width = shape
    labels = np.arange(n) % n_classes
    images = rng.integers(0, 80, size=(n, channels, height, width)).astype(np.uint8)
    for i, k in enumerate(labels):
        top, left = (k // 2 % 2) * height // 2, (k % 2) * width // 2
        images[i, :, top:top + height // 2, left:left + width // 2] = 200
        images[i, k % channels] = np.maximum(images[i, k % channels], 120)  # a tint per class
    return images, labels.astype(np.int64)


def write_prepared(out: Path, shape: tuple[int, int, int] = (3, 12, 12), n_classes: int = 4,
                   counts: dict[str, int] | None = None) -> Path:
    """`out` as a prepared folder: one shard per split (tasks/data/shards.py) and manifest.json."""
    counts = counts or {"train": 96, "val": 32, "test": 32}
    classes = [f"class{k}" for k in range(n_classes)]
    out.mkdir(parents=True, exist_ok=True)
    layout = RecordLayout("uint8", tuple(shape))
    splits, spec = {}, None
    for seed, (split, n) in enumerate(counts.items()):
        images, labels = synthetic_images(n, shape, n_classes, seed)
        if split == "train":
            spec = measure_spec(images, classes)
        splits[split] = split_entry([write_shard(out, split, 0, images, labels, layout)])
    manifest = {"format": FORMAT, "source": "synthetic", "classes": classes, "record": layout.to_dict(),
                "input_spec": spec.to_dict(), "image_shape": list(spec.shape),
                "normalization": {"mean": list(spec.mean), "std": list(spec.std)}, "counts": dict(counts),
                "splits": splits}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
