"""Benchmark: packed vs unpacked tuning, in one process on one device, same 32 configs, pruner off then on.

The same trial configurations (sampled once with a seeded random sampler, all with train.seed 0, so the
packs' data seed is each trial's own seed) are enqueued into four fresh Optuna studies and run through
`tuneline.tasks.tune.stage.run_tune`:

    pruner none: unpacked (one run_train per trial)  vs  packed (tune.packing=K)
    pruner asha: unpacked                            vs  packed

and for each it prints trials per minute, trial-epochs per minute, device-seconds (first trial start to
last trial end: the device does nothing else meanwhile) and the best validation accuracy, then the
packed/unpacked ratios and, without pruning, how far each packed trial's value is from its unpacked twin
(dropout masks are drawn per pack, so with dropout the twins differ by mask noise; --max-dropout 0
removes it).

    python bench/bench_packed.py                                    # CPU defaults: seed_mlp, 4,096 images, K=4
    python bench/bench_packed.py --device cuda                      # GPU defaults: seed_cnn, all images, K=16
    python bench/bench_packed.py --pack 8 --arch seed_cnn --limit-train 8192
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneline.core.config.data import DataConfig  # noqa: E402
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.params import build_params
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.fetch import run_fetch  # noqa: E402
from tuneline.tasks.lineage import Lineage  # noqa: E402
from tuneline.tasks.train.packed import Member, train_packed  # noqa: E402
from tuneline.tasks.data.prepare import run_prepare  # noqa: E402
from tuneline.tasks.train.loop import run_train  # noqa: E402
from tuneline.tasks.tune.space import suggest  # noqa: E402
from tuneline.tasks.tune.stage import run_tune, subset_prepared  # noqa: E402
from tuneline.tasks.tune.storage import storage_url  # noqa: E402
from tuneline.tasks.tune.study import create_study  # noqa: E402

# Everything here varies inside a pack; architecture and batch size are fixed so all 32 share one group.
SPACE = {
    "train.lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
    "train.optimizer": {"type": "categorical", "choices": ["adam", "adamw"]},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "train.beta1": {"type": "float", "low": 0.8, "high": 0.95},
    "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.1},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},  # scaled to 0..--max-dropout
}


def trial_configs(n: int, max_dropout: float = 0.5) -> list[dict]:
    """`n` configurations from a seeded random sampler: the same list for every study of the run."""
    import optuna

    from tuneline.core.config.tune import SpaceDim

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = []
    for _ in range(n):
        trial = scratch.ask()
        configs.append({key: suggest(trial, key, SpaceDim(**dim)) for key, dim in SPACE.items()})
        configs[-1]["model.dropout"] *= max_dropout / SPACE["model.dropout"]["high"]
        scratch.tell(trial, 0.0)
    return configs


def study(prepared: Path, workdir: Path, mode: str, pruner: str, configs: list[dict], args) -> dict:
    import optuna

    params = build_params({}, {
        "model.arch": args.arch, "train.scheduler": "none", "train.device": args.device, "train.seed": 0,
        "train.batch_size": args.batch_size, "tune.space": SPACE, "tune.n_trials": len(configs),
        "tune.epochs": args.epochs, "tune.pruner": pruner, "tune.min_resource": 1, "tune.reduction_factor": 3,
        "tune.limit_train": args.limit_train or None, "tune.limit_val": args.limit_val or None,
        "tune.study_name": f"bench-{mode}-{pruner}", "tune.packing": args.pack if mode == "packed" else None,
    })
    out = workdir / f"{mode}-{pruner}"
    url = storage_url(params.tune, out)
    out.mkdir(parents=True)
    enqueue = create_study(params.tune, params.tune.study_name, url)
    for config in configs:
        enqueue.enqueue_trial(config)
    result = run_tune(params, prepared, out, data_version="bench")
    trials = optuna.load_study(study_name=params.tune.study_name, storage=url).trials
    seconds = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    epochs = sum(len(t.intermediate_values) for t in trials)
    label = mode if mode == "unpacked" else f"packed K={args.pack}"
    return {"mode": label, "pruner": pruner, "best": result.best_value,
            "states": result.states, "seconds": seconds, "per_minute": len(trials) / seconds * 60,
            "trial_epochs": epochs, "epochs_per_minute": epochs / seconds * 60,
            "values": {t.number: t.value for t in trials if t.value is not None}}


def warm_up(prepared: Path, workdir: Path, args) -> None:
    """One short solo run and one short pack before timing, so neither mode pays first-call costs."""
    model_cfg = ModelConfig(arch=args.arch)
    train_cfg = TrainConfig(epochs=1, batch_size=args.batch_size, device=args.device, scheduler="none")
    run_train(model_cfg, train_cfg, prepared, workdir / "warm.pt", workdir / "warm.csv", Lineage("w", "w", "w"),
              show_progress=False)
    train_packed([Member(model_cfg, train_cfg), Member(model_cfg, train_cfg.model_copy(update={"seed": 1}))], prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--pack", type=int, default=None, help="K, trials per pack (default 16 on CUDA, 4 on CPU)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--arch", default=None, help="default seed_cnn on CUDA, seed_mlp on CPU")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit-train", type=int, default=None,
                        help="train slice; 0 = all (default: all on CUDA, 4096 on CPU)")
    parser.add_argument("--limit-val", type=int, default=1000, help="val slice; 0 = all")
    parser.add_argument("--pruners", default="none,asha", help="comma-separated: none, asha, hyperband, median")
    parser.add_argument("--max-dropout", type=float, default=0.5,
                        help="dropout range 0..this (0: none; a pack draws its own dropout masks, so with dropout "
                             "a packed trial and its unpacked twin differ by mask noise)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.device = "cuda" if cuda else "cpu"
    args.pack = args.pack or (16 if cuda else 4)
    args.arch = args.arch or ("seed_cnn" if cuda else "seed_mlp")
    args.limit_train = (0 if cuda else 4096) if args.limit_train is None else args.limit_train
    logging.basicConfig(level=logging.WARNING)

    default_mirror = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"
    mirror = os.environ.get("TUNELINE_DATA_MIRROR") or str(default_mirror)
    with tempfile.TemporaryDirectory(prefix="bench-packed-") as tmp:
        work = Path(tmp)
        run_fetch(DataConfig(), work / "raw", mirror=mirror)
        run_prepare(DataConfig(), work / "raw", work / "prepared")
        warm = subset_prepared(work / "prepared", work / "warm-data", 1024, 256, seed=0)
        warm_up(warm, work, args)
        configs = trial_configs(args.trials, args.max_dropout)
        cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        print(f"device: {torch.cuda.get_device_name() if cuda else cpu}; torch {torch.__version__}; {args.trials} "
              f"trials x <= {args.epochs} epochs, {args.arch}, batch {args.batch_size}, train slice "
              f"{args.limit_train or 'all'}, val slice {args.limit_val or 'all'}, packs of K={args.pack}, "
              f"dropout 0..{args.max_dropout}")
        rows = []
        for pruner in args.pruners.split(","):
            pair = [study(work / "prepared", work, mode, pruner, configs, args) for mode in ("unpacked", "packed")]
            for r in pair:
                print(f"  {r['pruner']:>5} {r['mode']:<12} {r['per_minute']:8.1f} trials/min  {r['seconds']:7.1f} "
                      f"device-s  best {r['best']:.4f}  {r['states']}", flush=True)
            rows.append(pair)
    print()
    print("| pruner | mode | trials/min | trial-epochs/min | device-seconds | trial-epochs | best val acc | trials |")
    print("|---|---|---|---|---|---|---|---|")
    for unpacked, packed in rows:
        for r in (unpacked, packed):
            print(f"| {r['pruner']} | {r['mode']} | {r['per_minute']:.1f} | {r['epochs_per_minute']:.1f} | "
                  f"{r['seconds']:.1f} | {r['trial_epochs']} | {r['best']:.4f} | {r['states']} |")
        trials_ratio = packed["per_minute"] / unpacked["per_minute"]
        epochs_ratio = packed["epochs_per_minute"] / unpacked["epochs_per_minute"]
        best_delta = 100 * (packed["best"] - unpacked["best"])
        print(f"| {unpacked['pruner']} | **ratio packed/unpacked** | **{trials_ratio:.2f}x** | {epochs_ratio:.2f}x | "
              f"{packed['seconds'] / unpacked['seconds']:.2f} | | {best_delta:+.2f} points | |")
    for unpacked, packed in rows:
        if unpacked["pruner"] == "none":  # same configs, same epochs: each trial against its twin
            twins = [n for n in unpacked["values"] if n in packed["values"]]
            deltas = [abs(packed["values"][n] - unpacked["values"][n]) * 100 for n in twins]
            print(f"\npruner none, trial by trial (packed vs its unpacked twin): mean |delta| "
                  f"{sum(deltas) / len(deltas):.2f} points, max {max(deltas):.2f} points over {len(deltas)} trials")

if __name__ == "__main__":
    main()
