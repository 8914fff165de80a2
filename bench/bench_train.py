"""Benchmark: the seed article's training recipe vs Tuneline's fastest default, in one process, same device.

(a) seed recipe, as written: torchvision MNIST dataset, ToTensor + Normalize, DataLoader batch 100,
    Adam lr 1e-3, the article's CNN, test accuracy evaluated after every epoch;
(b) Tuneline: `tuneline.tasks.train.loop.run_train` with the preset below (data resident on the device as uint8,
    randperm-slice batches, bf16 + channels_last on CUDA), test accuracy after every epoch via the
    engine's per-epoch callback.

Printed for each: training seconds to 99.0% and 99.4% test accuracy (evaluation excluded), final test
accuracy, images/s, and the ratios (seed / Tuneline). Warm-up (first epoch, incl. torch.compile where on)
is reported separately.

    python bench/bench_train.py                      # auto device; 10 epochs each on CUDA, fewer on CPU
    python bench/bench_train.py --seed-epochs 3 --epochs 3 --device cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneline.core.config.data import DataConfig  # noqa: E402
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.fetch import run_fetch  # noqa: E402
from tuneline.tasks.lineage import Lineage  # noqa: E402
from tuneline.tasks.model.architectures import SeedCNN  # noqa: E402
from tuneline.tasks.data.prepare import load_split, run_prepare  # noqa: E402
from tuneline.tasks.train.loop import predict_logits, resolve_device, run_train  # noqa: E402

# Tuneline's fastest default per device. CPU: the same network and optimizer as the seed (measured
# here: the seed recipe reaches 99.07% after one epoch, and bn_cnn's batch norm costs more CPU time per
# image than it saves in epochs), so the gain is the data layout alone; CUDA: large bf16 batches keep the
# GPU busy, batch norm + one-cycle converge in few epochs, compile fuses the small kernels.
FAST = {
    "cpu": dict(model=ModelConfig(arch="seed_cnn", dropout=0.5),
                train=dict(batch_size=100, optimizer="adam", lr=1e-3, scheduler="step", step_size=1, gamma=0.5)),
    "cuda": dict(model=ModelConfig(arch="bn_cnn", dropout=0.1),
                 train=dict(batch_size=512, optimizer="adamw", lr=4e-3, scheduler="onecycle", weight_decay=5e-4,
                            augment_rotate_deg=8, augment_translate=0.08, augment_scale=0.08,
                            precision="bf16", channels_last=True, compile=True)),
}
THRESHOLDS = (0.990, 0.994)


@dataclass
class Run:
    name: str
    epoch_seconds: list[float] = field(default_factory=list)  # training only, per epoch
    test_accuracy: list[float] = field(default_factory=list)
    images: int = 0

    def time_to(self, threshold: float) -> float | None:
        elapsed = 0.0
        for seconds, accuracy in zip(self.epoch_seconds, self.test_accuracy):
            elapsed += seconds
            if accuracy >= threshold:
                return elapsed
        return None

    @property
    def images_per_s(self) -> float:
        # Steady state: the first epoch carries warm-up (allocator, cuDNN autotune, compile).
        steady = self.epoch_seconds[1:] or self.epoch_seconds
        return self.images / (sum(steady) / len(steady))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seed_recipe(raw_dir: Path, device: torch.device, epochs: int) -> Run:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    # torchvision reads the decompressed files from <root>/MNIST/raw.
    root = Path(tempfile.mkdtemp(prefix="bench-seed-"))
    (root / "MNIST").mkdir()
    (root / "MNIST" / "raw").symlink_to(raw_dir.resolve())
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(str(root), train=True, download=False, transform=transform)
    test_set = datasets.MNIST(str(root), train=False, download=False, transform=transform)
    train_loader = DataLoader(train_set, batch_size=100, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=1000)
    torch.manual_seed(0)
    model = SeedCNN(n_classes=10, dropout=0.5).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = Run("seed recipe (DataLoader, batch 100, Adam 1e-3)", images=len(train_set))
    for epoch in range(1, epochs + 1):
        model.train()
        sync(device)
        started = time.perf_counter()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
        sync(device)
        run.epoch_seconds.append(time.perf_counter() - started)
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
        run.test_accuracy.append(correct / len(test_set))
        print(f"  seed     epoch {epoch}: {run.epoch_seconds[-1]:6.1f} s  test {run.test_accuracy[-1]:.4f}", flush=True)
    return run


def tuneline_fast(prepared: Path, device: torch.device, epochs: int) -> Run:
    preset = FAST[device.type]
    cfg = TrainConfig(epochs=epochs, device=device.type, **preset["train"])
    test_x, test_y = (t.to(device) for t in load_split(prepared, "test"))
    run = Run(f"tuneline ({preset['model'].arch}, batch {cfg.batch_size}, {cfg.optimizer} {cfg.lr:g} {cfg.scheduler})")
    run.images = len(load_split(prepared, "train")[1])

    def on_epoch(record: dict, model) -> None:
        run.epoch_seconds.append(record["seconds"])
        run.test_accuracy.append(float((predict_logits(model, test_x, 2000).argmax(1) == test_y).float().mean()))
        print(f"  tuneline epoch {record['epoch']}: {record['seconds']:6.1f} s  test {run.test_accuracy[-1]:.4f}", flush=True)

    out = Path(tempfile.mkdtemp(prefix="bench-tuneline-"))
    run_train(preset["model"], cfg, prepared, out / "model.pt", out / "history.csv", Lineage("bench", "bench", "bench"),
              checkpoint_dir=out / "ckpt", show_progress=False, on_epoch=on_epoch)
    return run


def fmt(value: float | None, unit: str = " s") -> str:
    return "not reached" if value is None else f"{value:.1f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=None, help="Tuneline epochs (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--seed-epochs", type=int, default=None, help="seed recipe epochs (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--mirror", default=os.environ.get("TUNELINE_DATA_MIRROR") or
                        str(Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    default_epochs = 10 if device.type == "cuda" else 3
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    run_fetch(DataConfig(), work / "raw", mirror=args.mirror)
    run_prepare(DataConfig(), work / "raw", work / "prepared")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    seed = seed_recipe(work / "raw", device, args.seed_epochs or default_epochs)
    ours = tuneline_fast(work / "prepared", device, args.epochs or default_epochs)

    print()
    print("| recipe | epochs | to 99.0% | to 99.4% | final test acc | images/s | first epoch (warm-up) |")
    print("|---|---|---|---|---|---|---|")
    for run in (seed, ours):
        print(f"| {run.name} | {len(run.epoch_seconds)} | {fmt(run.time_to(0.990))} | {fmt(run.time_to(0.994))} | "
              f"{run.test_accuracy[-1]:.4f} | {run.images_per_s:,.0f} | {run.epoch_seconds[0]:.1f} s |")
    print(f"| ratio seed/tuneline | | {ratio(seed.time_to(0.990), ours.time_to(0.990))} | "
          f"{ratio(seed.time_to(0.994), ours.time_to(0.994))} | | {ratio(ours.images_per_s, seed.images_per_s)} (throughput) | |")


if __name__ == "__main__":
    main()
