"""Benchmark: CIFAR-10 time-to-accuracy of the fast network (fast_cnn) vs the seed CNN, in one process, same device.

Both train through Tuneline's own loop (`tuneline.tasks.train.loop.run_train`: data on the device as uint8, randperm
batches) on the same prepared CIFAR-10 split (the JPEG release in ../shared/data/cifar10: 45,833 train /
4,167 val, test on the 10,000 test images), and report test accuracy after every epoch:

(a) baseline: the seed article's CNN and recipe (seed_cnn, Adam 1e-3, batch 100, step decay 0.5/epoch), as
    an MNIST user would first try it on CIFAR-10;
(b) fast_cnn (tasks/model/fastnet.py, airbench94's layout scaled by `width`) with airbench's recipe: SGD +
    Nesterov, one-cycle, label smoothing, flip augmentation, channels_last; on CUDA also bf16 and compile
    and airbench94's width (the GPU target is 94%).

Printed for each: seconds to 70/80/90/94% test accuracy (training + validation; the extra test evaluation
excluded), the per-epoch seconds, CPU-seconds (this process, all threads: comparable when other jobs
share the cores) and test accuracy, and the ratio baseline / fast_cnn.

    python bench/bench_cifar.py                                  # auto device, presets below
    python bench/bench_cifar.py --epochs 8 --baseline-epochs 4 --device cpu
    python bench/bench_cifar.py --width 24 --batch-size 512 --lr 0.4 --no-baseline
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import Run as TrainingRun  # noqa: E402 - the sibling script (bench/ is sys.path[0] when run)
from tuneline.core.config.model import ModelConfig  # noqa: E402
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.prepare import load_split, measure_spec, stratified_take  # noqa: E402
from tuneline.tasks.lineage import Lineage  # noqa: E402
from tuneline.tasks.train.loop import predict_logits, resolve_device, run_train  # noqa: E402

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"
MILESTONES = (0.70, 0.80, 0.90, 0.94)
VAL_FRACTION = 0.083333  # data.val_fraction's default: the split the pipeline trains on

# The fast network's recipe per device. CPU (2 cores): width 16 is the best accuracy per CPU-second measured
# (docs/benchmarks.md, CIFAR-10); CUDA: airbench94's scale (stem 64 -> groups 128/256/512), bf16, compile.
FAST = {
    # CPU: AdamW, not airbench's SGD: SGD (lr 0.2, Nesterov, logits / 9) sat at 30% test accuracy after two full
    # epochs of an 8-epoch one-cycle here, AdamW 3e-3 with unscaled logits learnt fastest on 8k-image slices.
    "cpu": dict(width=16, logit_scale=1.0, epochs=8,
                train=dict(batch_size=256, optimizer="adamw", lr=3e-3, weight_decay=5e-4, scheduler="onecycle",
                           onecycle_pct_start=0.25, label_smoothing=0.1, augment_flip=True, channels_last=True)),
    "cuda": dict(width=64, logit_scale=1 / 9, epochs=12, train=dict(batch_size=1024, optimizer="sgd", lr=0.8, momentum=0.85,
                                               nesterov=True, weight_decay=5e-4, scheduler="onecycle",
                                               onecycle_pct_start=0.2, label_smoothing=0.2, augment_flip=True,
                                               augment_translate=0.0625, channels_last=True, precision="bf16",
                                               compile=True)),
}
BASELINE = dict(batch_size=100, optimizer="adam", lr=1e-3, scheduler="step", step_size=1, gamma=0.5)


def load_cifar(archive: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    """The archive's train/test JPEGs as uint8 NCHW arrays + int64 labels (decoded once, cached by checksum)."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    cached = cache_dir / f"cifar10-{digest}.npz"
    if cached.is_file():
        with np.load(cached) as data:
            return dict(data)
    from PIL import Image

    images: dict[str, list] = {"train": [], "test": []}
    names: dict[str, list] = {"train": [], "test": []}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or not member.name.endswith(".jpg") or parts[-3] not in images:
                continue
            pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
            images[parts[-3]].append(pixels.transpose(2, 0, 1))
            names[parts[-3]].append(parts[-2])
    classes = sorted(set(names["train"]))
    data = {"classes": np.array(classes)}
    for split in images:
        data[f"{split}_x"] = np.stack(images[split])
        data[f"{split}_y"] = np.array([classes.index(n) for n in names[split]], dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cached, **data)
    return data


def write_prepared(data: dict[str, np.ndarray], out: Path, seed: int = 0) -> Path:
    """A prepared folder as `tuneline stage prepare` writes it (NCHW uint8 .npy + manifest with the input spec)."""
    classes = [str(c) for c in data["classes"]]
    val_idx, train_idx = stratified_take(data["train_y"], round(len(data["train_y"]) * VAL_FRACTION), seed)
    splits = {"train": (data["train_x"][train_idx], data["train_y"][train_idx]),
              "val": (data["train_x"][val_idx], data["train_y"][val_idx]), "test": (data["test_x"], data["test_y"])}
    spec = measure_spec(splits["train"][0], classes)
    out.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    for split, (images, labels) in splits.items():
        for kind, array in (("images", images), ("labels", labels)):
            np.save(out / f"{split}-{kind}.npy", np.ascontiguousarray(array), allow_pickle=False)
            files[f"{split}-{kind}.npy"] = f"{split}-{len(labels)}"
        counts[split] = int(len(labels))
    manifest = {"source": "cifar10-jpg", "classes": classes, "input_spec": spec.to_dict(),
                "image_shape": list(spec.shape), "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
                "counts": counts, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@dataclass
class Run(TrainingRun):
    """bench_train's run and time_to, its epoch_seconds here being training + validation wall seconds, plus CPU
    seconds and val accuracy per epoch."""
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time per epoch (all threads)
    val_accuracy: list[float] = field(default_factory=list)


def train(name: str, model_cfg: ModelConfig, cfg: TrainConfig, prepared: Path, device: torch.device) -> Run:
    test_x, test_y = (t.to(device) for t in load_split(prepared, "test"))
    run = Run(name)
    cpu = [time.process_time()]

    def on_epoch(record: dict, model) -> None:
        run.cpu_seconds.append(time.process_time() - cpu[0])
        run.epoch_seconds.append(record["seconds"])
        run.val_accuracy.append(record["val_accuracy"])
        run.test_accuracy.append(float((predict_logits(model, test_x, 1000).argmax(1) == test_y).float().mean()))
        print(f"  {model_cfg.arch:9s} epoch {record['epoch']:2d}: {record['seconds']:6.1f} s "
              f"({run.cpu_seconds[-1]:6.1f} CPU-s)  val {record['val_accuracy']:.4f}  test {run.test_accuracy[-1]:.4f}",
              flush=True)
        cpu[0] = time.process_time()  # the test evaluation above is not the epoch's

    out = Path(tempfile.mkdtemp(prefix="bench-cifar-"))
    run_train(model_cfg, cfg, prepared, out / "model.pt", out / "history.csv", Lineage("bench", "bench", "bench"),
              checkpoint_dir=out / "ckpt", show_progress=False, on_epoch=on_epoch)
    return run


def fmt(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tuneline-bench")
    parser.add_argument("--epochs", type=int, help="fast_cnn epochs (preset: 8 on CPU, 12 on CUDA)")
    parser.add_argument("--width", type=int, help="fast_cnn width (preset: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--baseline-epochs", type=int, default=None, help="seed CNN epochs (default: 4 on CPU, 12 on CUDA)")
    parser.add_argument("--no-baseline", action="store_true", help="only the fast network")
    parser.add_argument("--limit-train", type=int, help="train on a stratified slice (quick looks)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    preset = FAST[device.type]
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                                   ("label_smoothing", args.label_smoothing)) if v is not None}
    fast_cfg = TrainConfig(epochs=args.epochs or preset["epochs"], device=device.type, **{**preset["train"], **overrides})
    width = args.width or preset["width"]

    started = time.perf_counter()
    data = load_cifar(args.archive, args.cache)
    if args.limit_train:
        keep, _ = stratified_take(data["train_y"], args.limit_train, 0)
        data = {**data, "train_x": data["train_x"][keep], "train_y": data["train_y"][keep]}
    prepared = write_prepared(data, Path(tempfile.mkdtemp(prefix="bench-cifar-prepared-")))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores")
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}{load}; "
          f"data ready in {time.perf_counter() - started:.1f} s")

    runs = []
    if not args.no_baseline:
        runs.append(train("seed_cnn (Adam 1e-3, batch 100, step decay)", ModelConfig(arch="seed_cnn", dropout=0.5),
                          TrainConfig(epochs=args.baseline_epochs or (4 if device.type == "cpu" else 12),
                                      device=device.type, **BASELINE), prepared, device))
    c = fast_cfg
    runs.append(train(f"fast_cnn width {width} ({c.optimizer} lr {c.lr:g}, batch {c.batch_size}, {c.scheduler}, "
                      f"smoothing {c.label_smoothing:g}, flip)",
                      ModelConfig(arch="fast_cnn", dropout=0.0, kwargs={"width": width, "logit_scale": preset["logit_scale"]}),
                      fast_cfg, prepared, device))

    print()
    print("| recipe | epochs | s/epoch | CPU-s/epoch | " + " | ".join(f"to {m:.0%}" for m in MILESTONES)
          + " | test acc per epoch | final test |")
    print("|---|---|---|---|" + "---|" * len(MILESTONES) + "---|---|")
    for run in runs:
        per_epoch = sum(run.epoch_seconds) / len(run.epoch_seconds)
        cpu_per_epoch = sum(run.cpu_seconds) / len(run.cpu_seconds)
        print(f"| {run.name} | {len(run.epoch_seconds)} | {per_epoch:.0f} | {cpu_per_epoch:.0f} | "
              + " | ".join(fmt(run.time_to(m)) for m in MILESTONES)
              + f" | {' '.join(f'{a:.3f}' for a in run.test_accuracy)} | {run.test_accuracy[-1]:.4f} |")
    if len(runs) == 2:
        base, fast = runs
        ratios = [f"{base.time_to(m) / fast.time_to(m):.1f}x" if base.time_to(m) and fast.time_to(m) else "n/a"
                  for m in MILESTONES]
        print(f"| ratio seed/fast (time) | | | | " + " | ".join(ratios) + " | | |")


if __name__ == "__main__":
    main()
