"""Benchmark: the seed article's training recipe vs the recipe params.yaml sets, in one process, same device.

Both arms train the same images (the prepared train split: 55,000 of MNIST's 60,000; the rest is Tuneline's
validation split) and are scored on the 10,000 test images after every epoch; the clock runs from before the
data is loaded to the end of each epoch, test scoring excluded.

(a) seed recipe, as written: the images through a map-style Dataset with ToTensor + Normalize((0.1307,),
    (0.3081,)) per image, DataLoader batch 100 shuffled, Adam lr 1e-3, the article's CNN (dropout 0.5).
(b) Tuneline: `tuneline.tasks.train.loop.run_train` with params.yaml's `model` and `train` sections exactly
    (what `make run` trains when tuning is off; `--params` picks another file, `-S key=value` overrides), its own
    per-epoch validation included in its time.

Printed for each arm and run: seconds to 99.0% and 99.4% test accuracy, final accuracy, images/s; then the
medians over `--runs` and their ratios (seed / Tuneline).

    python bench/bench_train.py --device cpu              # 3 runs of each arm, alternating
    python bench/bench_train.py --device cpu --runs 1 --seed-epochs 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneline.core.config.data import DataConfig  # noqa: E402
from tuneline.core.config.params import load_params  # noqa: E402
from tuneline.core.config.overrides import parse_overrides  # noqa: E402
from tuneline.tasks.data.fetch import run_fetch  # noqa: E402
from tuneline.tasks.data.prepare import load_split, run_prepare  # noqa: E402
from tuneline.tasks.lineage import Lineage  # noqa: E402
from tuneline.tasks.model.architectures import SeedCNN  # noqa: E402
from tuneline.tasks.train.loop import predict_logits, resolve_device, run_train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.990, 0.994)


@dataclass
class Run:
    name: str
    elapsed: list[float] = field(default_factory=list)  # seconds from the start to the end of each epoch
    test_accuracy: list[float] = field(default_factory=list)
    images: int = 0  # per epoch

    def time_to(self, threshold: float) -> float | None:
        return next((t for t, a in zip(self.elapsed, self.test_accuracy) if a >= threshold), None)

    @property
    def images_per_s(self) -> float:
        # Steady state: the first epoch carries the data load and warm-up (allocator, compile).
        steps = np.diff([0.0, *self.elapsed])
        steady = steps[1:] if len(steps) > 1 else steps
        return self.images / float(np.mean(steady))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class SeedDataset(torch.utils.data.Dataset):
    """The seed's per-image pipeline (torchvision's ToTensor then Normalize) over the same uint8 images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float().div(255.0)          # ToTensor: [1, 28, 28] in 0..1
        return (image - 0.1307) / 0.3081, int(self.labels[index])  # Normalize((0.1307,), (0.3081,))


def seed_recipe(prepared: Path, device: torch.device, epochs: int, seed: int) -> Run:
    from torch.utils.data import DataLoader

    started = time.perf_counter()
    train_x, train_y = load_split(prepared, "train")
    train_loader = DataLoader(SeedDataset(train_x, train_y), batch_size=100, shuffle=True)
    test_x, test_y = load_split(prepared, "test")
    test_x = ((test_x.float() / 255.0 - 0.1307) / 0.3081).to(device)
    torch.manual_seed(seed)
    model = SeedCNN(n_classes=10, dropout=0.5).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = Run("seed recipe (Dataset + DataLoader, batch 100, Adam 1e-3, seed CNN)", images=len(train_y))
    scoring = 0.0
    for _ in range(epochs):
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
        sync(device)
        run.elapsed.append(time.perf_counter() - started - scoring)
        scored = time.perf_counter()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000].to(device)).sum())
                          for i in range(0, len(test_y), 1000))
        run.test_accuracy.append(correct / len(test_y))
        scoring += time.perf_counter() - scored
        print(f"  seed     epoch {len(run.elapsed)}: {run.elapsed[-1]:6.1f} s  test {run.test_accuracy[-1]:.4f}", flush=True)
    return run


def tuneline_recipe(prepared: Path, device: torch.device, params, epochs: int | None) -> Run:
    train = params.train.model_copy(update={"device": device.type, "resume": False,
                                            **({"epochs": epochs} if epochs else {})})
    test_x, test_y = load_split(prepared, "test")
    test_x = test_x.to(device)
    run = Run(f"tuneline ({params.model.arch}, batch {train.batch_size}, {train.optimizer} {train.lr:g} "
              f"{train.scheduler}, {train.epochs} epochs, {train.precision})")
    run.images = train.images_per_epoch or len(load_split(prepared, "train")[1])
    scoring = 0.0

    def on_epoch(record: dict, model) -> None:
        nonlocal scoring
        sync(device)
        run.elapsed.append(time.perf_counter() - started - scoring)
        scored = time.perf_counter()
        run.test_accuracy.append(float((predict_logits(model, test_x, 2000).argmax(1) == test_y.to(device)).float().mean()))
        scoring += time.perf_counter() - scored
        print(f"  tuneline epoch {record['epoch']}: {run.elapsed[-1]:6.1f} s  test {run.test_accuracy[-1]:.4f}", flush=True)

    out = Path(tempfile.mkdtemp(prefix="bench-tuneline-"))
    started = time.perf_counter()  # run_train loads the data onto the device: counted
    run_train(params.model, train, prepared, out / "model.pt", out / "history.csv", Lineage("bench", "bench", "bench"),
              checkpoint_dir=out / "ckpt", show_progress=False, on_epoch=on_epoch)
    return run


def fmt(value: float | None, unit: str = " s") -> str:
    return "not reached" if value is None else f"{value:.1f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "n/a"


def median_or_none(values: list[float | None]) -> float | None:
    """The median over runs; a run that never reached the mark counts as slower than any that did."""
    if sum(v is None for v in values) * 2 >= len(values):
        return None
    return statistics.median(float("inf") if v is None else v for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the recipe Tuneline trains")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--epochs", type=int, default=None, help="Tuneline epochs (default: the params' train.epochs)")
    parser.add_argument("--seed-epochs", type=int, default=2, help="seed recipe epochs")
    parser.add_argument("--runs", type=int, default=3, help="runs of each arm, alternating; medians are reported")
    parser.add_argument("--mirror", default=os.environ.get("TUNELINE_DATA_MIRROR") or
                        str(REPO.parent / "shared" / "data" / "MNIST" / "raw"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    params = load_params(args.params, parse_overrides(args.set))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    run_fetch(DataConfig(), work / "raw", mirror=args.mirror)
    run_prepare(params.data.model_copy(update={"source": "mnist"}), work / "raw", work / "prepared")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"recipe {args.params}{' ' + ' '.join(args.set) if args.set else ''}")
    seeds, ours = [], []
    for index in range(args.runs):
        print(f"run {index + 1}/{args.runs}", flush=True)
        seeds.append(seed_recipe(work / "prepared", device, args.seed_epochs, seed=index))
        ours.append(tuneline_recipe(work / "prepared", device, params, args.epochs))

    print()
    print("| run | recipe | images/epoch | epochs | to 99.0% | to 99.4% | final test acc | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for index, pair in enumerate(zip(seeds, ours), start=1):
        for run in pair:
            print(f"| {index} | {run.name} | {run.images:,} | {len(run.elapsed)} | {fmt(run.time_to(0.990))} | "
                  f"{fmt(run.time_to(0.994))} | {run.test_accuracy[-1]:.4f} | {run.images_per_s:,.0f} |")
    medians = {label: [median_or_none([r.time_to(t) for r in runs]) for t in THRESHOLDS]
               for label, runs in (("seed", seeds), ("tuneline", ours))}
    throughput = [statistics.median(r.images_per_s for r in runs) for runs in (seeds, ours)]
    print(f"| median of {args.runs} | seed | | | {fmt(medians['seed'][0])} | {fmt(medians['seed'][1])} | | "
          f"{throughput[0]:,.0f} |")
    print(f"| median of {args.runs} | tuneline | | | {fmt(medians['tuneline'][0])} | {fmt(medians['tuneline'][1])} | | "
          f"{throughput[1]:,.0f} |")
    print(f"| ratio seed/tuneline | | | | {ratio(medians['seed'][0], medians['tuneline'][0])} | "
          f"{ratio(medians['seed'][1], medians['tuneline'][1])} | | {ratio(throughput[1], throughput[0])} (throughput) |")


if __name__ == "__main__":
    main()
