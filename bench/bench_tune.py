"""Benchmark: the same study with and without pruning, in one process, same device, same seed and trials.

Runs `tasks.tune.stage.run_tune` twice over one search space — (a) successive halving (ASHA), (b) no pruning —
and prints for each the best validation accuracy, trials by state, total trial-epochs and device-seconds
(the sum of trial durations), and the ratios (a)/(b).

    python bench/bench_tune.py                                  # CPU-sized defaults: a slice of MNIST
    python bench/bench_tune.py --trials 64 --epochs 9 --arch bn_cnn --limit-train 0   # GPU-sized
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import DataConfig, build_params  # noqa: E402
from tasks.data.fetch import run_fetch  # noqa: E402
from tasks.data.prepare import run_prepare  # noqa: E402
from tasks.tune.stage import run_tune  # noqa: E402

SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "train.optimizer": {"type": "categorical", "choices": ["adam", "adamw", "sgd"]},
    "train.batch_size": {"type": "categorical", "choices": [64, 128, 256]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.6},
}


def study(prepared: Path, workdir: Path, pruner: str, args) -> dict:
    params = build_params({}, {
        "model.arch": args.arch, "train.scheduler": "none", "train.device": args.device,
        "tune.space": SPACE, "tune.n_trials": args.trials, "tune.epochs": args.epochs, "tune.pruner": pruner,
        "tune.min_resource": 1, "tune.reduction_factor": 3, "tune.sampler_seed": 0,
        "tune.limit_train": args.limit_train or None, "tune.limit_val": args.limit_val or None,
        "tune.study_name": f"bench-{pruner}",
    })
    result = run_tune(params, prepared, workdir / pruner, data_version="bench")
    rows = list(csv.DictReader(open(result.trials_csv)))
    return {"pruner": pruner, "best": result.best_value, "states": result.states,
            "trial_epochs": sum(int(r["epochs_run"] or 0) for r in rows),
            "seconds": sum(float(r["duration_s"] or 0) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=9, help="max epochs per trial (ASHA rungs at 1, 3, 9)")
    parser.add_argument("--arch", default="seed_mlp")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--limit-train", type=int, default=2000, help="0: the whole train split")
    parser.add_argument("--limit-val", type=int, default=1000, help="0: the whole val split")
    parser.add_argument("--mirror", default=os.environ.get("TUNELINE_DATA_MIRROR") or
                        str(Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    run_fetch(DataConfig(), work / "raw", mirror=args.mirror)
    run_prepare(DataConfig(), work / "raw", work / "prepared")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({platform.processor() or 'unknown'}, {os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; {args.trials} trials x <= {args.epochs} epochs, "
          f"{args.arch}, train slice {args.limit_train or 'all'}, val slice {args.limit_val or 'all'}")
    pruned = study(work / "prepared", work, "asha", args)
    full = study(work / "prepared", work, "none", args)
    print()
    print("| study | best val acc | trials | trial-epochs | device-seconds |")
    print("|---|---|---|---|---|")
    for s in (pruned, full):
        print(f"| {s['pruner']} | {s['best']:.4f} | {s['states']} | {s['trial_epochs']} | {s['seconds']:.1f} |")
    print(f"| ratio asha/none | {100 * (pruned['best'] - full['best']):+.2f} points | | "
          f"{pruned['trial_epochs'] / full['trial_epochs']:.2f} | {pruned['seconds'] / full['seconds']:.2f} |")


if __name__ == "__main__":
    main()
