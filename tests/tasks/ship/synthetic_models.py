"""Tiny models of any input spec, trained and exported as the pipeline does, for registry and serving tests.

The data is written as prepare writes it (uint8 NCHW .npy splits + a manifest with the input spec measured by
tuneline.tasks.data.prepare.measure_spec), so no raw source is needed. Class k lights quadrant k % 4 of channel k % C:
a seed CNN learns it in one epoch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SPLITS = {"train": 40, "val": 8, "test": 10}  # images per class


def synthetic_images(labels: np.ndarray, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, C, size, size]: dim noise, with quadrant (label % 4) of channel (label % C) bright."""
    images = rng.integers(0, 60, size=(len(labels), channels, size, size), dtype=np.uint8)
    half = size // 2
    for i, label in enumerate(labels):
        row, col = divmod(int(label) % 4, 2)
        images[i, int(label) % channels, row * half:(row + 1) * half, col * half:(col + 1) * half] += 180
    return images


def write_prepared(folder: Path, channels: int, size: int, classes: list[str], seed: int = 0) -> Path:
    """A prepared folder (as tuneline.tasks.data.prepare writes it) of synthetic images of shape (channels, size, size)."""
    from tuneline.tasks.data.prepare import measure_spec

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    manifest = {"source": "synthetic", "classes": classes, "counts": {}, "files": {}}
    for split, per_class in SPLITS.items():
        labels = np.repeat(np.arange(len(classes)), per_class).astype(np.int64)
        images = synthetic_images(labels, channels, size, rng)
        if split == "train":
            spec = measure_spec(images, classes)
        for kind, array in (("images", images), ("labels", labels)):
            path = folder / f"{split}-{kind}.npy"
            np.save(path, array, allow_pickle=False)
            manifest["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest["counts"][split] = int(labels.size)
    manifest.update(input_spec=spec.to_dict(), image_shape=list(spec.shape),
                    normalization={"mean": list(spec.mean), "std": list(spec.std)})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def train_and_export(prepared: Path, out: Path, model_name: str, epochs: int = 2, model=None):
    """A model (default seed_cnn; `model` a ModelConfig) trained on `prepared`, evaluated and exported (FP32 only)
    under `model_name`: the ExportResult; eval.json and export.json lie beside its .onnx_path."""
    from tuneline.core.config.export import ExportConfig
    from tuneline.core.config.gate import GateConfig
    from tuneline.core.config.model import ModelConfig
    from tuneline.core.config.train import TrainConfig
    from tuneline.tasks.evaluate.evaluate import run_evaluate
    from tuneline.tasks.lineage import Lineage
    from tuneline.tasks.ship.export import run_export
    from tuneline.tasks.train.loop import run_train

    out.mkdir(parents=True, exist_ok=True)
    run_train(model or ModelConfig(arch="seed_cnn", dropout=0.0), TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, device="cpu"),
              prepared, out / "model.pt", out / "history.csv", Lineage("synthetic.dir", "s" * 16, "c" * 40))
    gates = GateConfig(min_accuracy=0.0, min_class_recall=0.0, max_ece=1.0, max_latency_p99_ms=1000.0)
    run_evaluate(out / "model.pt", prepared, out / "eval.json", out / "confusion.csv", gates, TrainConfig(device="cpu"),
                 enforce=False)
    return run_export(ExportConfig(int8=False, latency_runs=10), out / "model.pt", prepared, out / "eval.json",
                      out / "model.onnx", report_path=out / "export.json", model_name=model_name)
