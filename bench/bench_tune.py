"""Benchmark: do pruning and packing pay? The same enqueued trial configurations in four arms, 3 sampler seeds.

For each seed a seeded random sampler draws `--trials` configurations once; every arm — no pruning (none),
ASHA (asha), packed without a pruner (packed: tune.packing=--pack) and packed with ASHA (packed-asha, whose
pruned slots are refilled) — gets a fresh study with exactly those configurations enqueued, run through
`tuneline.tasks.tune.stage.run_tune`, in this process, on one device. The arms' order rotates from seed to seed, so
load from other processes on the machine falls on all alike. For each arm it prints the best validation
accuracy, trials per minute, device-seconds (one definition for every bench: the wall span during which the
device was busy with trials, first trial start to last trial end), the process CPU-seconds of that span
(less disturbed by other load), the ratios against no pruning and packed-asha/asha, and where the time went:

- per-trial set-up (data, model, optimizer: the trial's start to its first batch), training, validation,
  and the trial's remaining in-trial cost (reports to the pruner, user attrs, teardown);
- study overhead between trials (the sampler's ask, tell, the budget check);
- the rung schedule, trial-epochs, and what ASHA pruned: the no-pruning rank of each config it kept, and how
  well each rung's accuracy ranks the configs' final accuracy (Spearman), which is what a rung can see.

The space holds only settings each member of a pack has its own value of (tasks/train/packed.py: per_model), so
every configuration can share a pack; batch size or optimizer family in the space would split the packs.

    python bench/bench_tune.py                           # CPU-sized defaults: seed MLP on MNIST slices
    python bench/bench_tune.py --trials 32 --epochs 9 --arch bn_cnn --limit-train 0 --pack 16   # GPU-sized
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneline.core.config.data import DataConfig  # noqa: E402
from tuneline.core.config.params import build_params
from tuneline.core.config.tune import SpaceDim
from tuneline.tasks.data.fetch import run_fetch  # noqa: E402
from tuneline.tasks.data.prepare import run_prepare  # noqa: E402
from tuneline.tasks.tune.space import suggest  # noqa: E402
from tuneline.tasks.tune.stage import run_tune  # noqa: E402
from tuneline.tasks.tune.storage import storage_url  # noqa: E402
from tuneline.tasks.tune.study import create_study, rung_epochs  # noqa: E402

SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "train.optimizer": {"type": "categorical", "choices": ["adam", "adamw"]},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.6},
}
ARMS = {"none": ("none", None), "asha": ("asha", None), "packed": ("none", "pack"), "packed-asha": ("asha", "pack")}


def trial_configs(n: int, seed: int) -> list[dict]:
    """`n` configurations from a random sampler seeded with `seed`: the same list for every arm of that seed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(n):
        trial = scratch.ask()
        configs.append({key: suggest(trial, key, SpaceDim(**dim)) for key, dim in SPACE.items()})
        scratch.tell(trial, 0.0)
    return configs


def arm(prepared: Path, workdir: Path, name: str, seed: int, configs: list[dict], args) -> dict:
    """One study: the configs enqueued, run, and measured."""
    import optuna

    pruner, packed = ARMS[name]
    overrides = {
        "model.arch": args.arch, "train.scheduler": "none", "train.device": args.device, "train.seed": 0,
        "tune.space": SPACE, "tune.n_trials": len(configs), "tune.epochs": args.epochs, "tune.pruner": pruner,
        "tune.sampler_seed": seed, "tune.limit_train": args.limit_train or None,
        "tune.limit_val": args.limit_val or None, "tune.study_name": f"bench-{name}-{seed}",
        "tune.packing": args.pack if packed else None,
    }
    overrides.update({f"tune.{key}": value for key, value in args.tune_overrides.items()})
    params = build_params({}, overrides)
    out = workdir / f"{name}-{seed}"
    out.mkdir(parents=True)
    url = storage_url(params.tune, out)
    enqueue = create_study(params.tune, params.tune.study_name, url)
    for config in configs:
        enqueue.enqueue_trial(config)
    cpu0 = time.process_time()
    result = run_tune(params, prepared, out, data_version="bench")
    cpu = time.process_time() - cpu0
    trials = sorted(optuna.load_study(study_name=params.tune.study_name, storage=url).trials, key=lambda t: t.number)
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    attr = lambda key: sum(float(t.user_attrs.get("times", {}).get(key, t.user_attrs.get(key, 0.0)))  # noqa: E731
                           for t in trials)
    parts = {"setup": attr("setup_s"), "train": attr("train_s"), "val": attr("val_s"), "epochs": attr("epoch_s")}
    if not parts["epochs"]:
        parts["epochs"] = parts["train"] + parts["val"]
    in_trial = sum(durations) - parts["setup"] - parts["epochs"]
    return {
        "pruner": name, "seed": seed, "best": result.best_value, "states": result.states, "span": span, "cpu": cpu,
        "per_minute": len(trials) / span * 60, "durations": sum(durations), "parts": parts, "in_trial": in_trial,
        "between": span - sum(durations), "trial_epochs": sum(int(t.user_attrs.get("epochs_run", 0)) for t in trials),
        "validations": sum(len(t.intermediate_values) for t in trials),
        "rungs": rung_epochs(params.tune) if pruner in ("asha", "hyperband") else [],
        "epochs_seen": sorted({step for t in trials for step in t.intermediate_values}),
        "values": {t.number: t.value for t in trials}, "curves": {t.number: dict(t.intermediate_values) for t in trials},
        "pruned_at": {t.number: max(t.intermediate_values) for t in trials if t.state.name == "PRUNED"},
        "schedule": params.tune,
    }


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def pruning_report(full: dict, pruned: dict) -> str:
    """What ASHA kept and cut, against the no-pruning arm's final ranking of the same configs."""
    order = sorted(full["values"], key=lambda n: -full["values"][n])
    rank = {n: i + 1 for i, n in enumerate(order)}
    kept = sorted(rank[n] for n in pruned["values"] if n not in pruned["pruned_at"])
    best = order[0]
    fate = f"pruned after epoch {pruned['pruned_at'][best]}" if best in pruned["pruned_at"] else "kept to the end"
    rho = []
    for step in full["epochs_seen"]:
        xs = [full["curves"][n].get(step) for n in order]
        if all(x is not None for x in xs):
            rho.append(f"epoch {step}: {spearman(xs, [full['values'][n] for n in order]):.2f}")
    return (f"seed {full['seed']}: ASHA completed the configs ranked {kept} without pruning; the best config "
            f"(#{best}, {full['values'][best]:.4f}) was {fate}. Rank correlation of epoch-e accuracy with the final "
            f"best, no-pruning arm: {', '.join(rho)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6, help="max epochs per trial (the pruner's max resource)")
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds: each draws its own configurations")
    parser.add_argument("--arch", default="seed_mlp")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--limit-train", type=int, default=2000, help="0: the whole train split")
    parser.add_argument("--limit-val", type=int, default=5000, help="0: the whole val split (5,000 images)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"any of {', '.join(ARMS)}; the first is the baseline")
    parser.add_argument("--pack", type=int, default=4, help="tune.packing of the packed arms (trials per pack)")
    parser.add_argument("-S", dest="tune_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a tune.* setting for every arm, e.g. -S min_resource=1 (repeatable)")
    parser.add_argument("--mirror", default=os.environ.get("TUNELINE_DATA_MIRROR") or
                        str(Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"))
    args = parser.parse_args()
    args.tune_overrides = dict(item.split("=", 1) for item in args.tune_overrides)
    logging.basicConfig(level=logging.WARNING)
    pruners = args.arms.split(",")
    unknown = sorted(set(pruners) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        run_fetch(DataConfig(), work / "raw", mirror=args.mirror)
        run_prepare(DataConfig(), work / "raw", work / "prepared")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        print(f"device: {device}; torch {torch.__version__}; {args.trials} trials x <= {args.epochs} epochs, "
              f"{args.arch}, train slice {args.limit_train or 'all'}, val slice {args.limit_val or 'all'}, "
              f"seeds {seeds}, packs of {args.pack}, tune overrides {args.tune_overrides or 'none'}; load average "
              f"{' '.join(Path('/proc/loadavg').read_text().split()[:3]) if Path('/proc/loadavg').exists() else 'n/a'}",
              flush=True)
        runs: dict[str, list[dict]] = {p: [] for p in pruners}
        for seed in seeds:
            configs = trial_configs(args.trials, seed)
            shift = seed % len(pruners)
            for pruner in pruners[shift:] + pruners[:shift]:  # rotate who goes first
                r = arm(work / "prepared", work, pruner, seed, configs, args)
                runs[pruner].append(r)
                print(f"  seed {seed} {pruner:>11}: best {r['best']:.4f}  {r['span']:6.1f} device-s  {r['cpu']:6.1f} cpu-s "
                      f" {r['per_minute']:6.1f} trials/min  {r['trial_epochs']} trial-epochs  {r['states']}", flush=True)
    print()
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    print(f"Median of {len(seeds)} seeds:\n")
    print("| study | best val acc | trials/min | device-seconds | CPU-seconds | trial-epochs | validations | rungs |")
    print("|---|---|---|---|---|---|---|---|")
    for p in pruners:
        rs = runs[p]
        print(f"| {p} | {med(rs, lambda r: r['best']):.4f} | {med(rs, lambda r: r['per_minute']):.1f} | "
              f"{med(rs, lambda r: r['span']):.1f} | {med(rs, lambda r: r['cpu']):.1f} | "
              f"{med(rs, lambda r: r['trial_epochs']):.0f} | {med(rs, lambda r: r['validations']):.0f} | "
              f"{', '.join(map(str, rs[0]['rungs'] + [args.epochs])) if rs[0]['rungs'] else '-'} |")
    pairs = [(p, pruners[0]) for p in pruners[1:]]
    if "packed-asha" in runs and "asha" in runs and pruners[0] != "asha":
        pairs.append(("packed-asha", "asha"))
    for p, b in pairs:
        rs, base = runs[p], runs[b]
        delta = [100 * (a["best"] - b["best"]) for a, b in zip(rs, base)]
        print(f"| ratio {p}/{b} (median of per-seed) | {statistics.median(delta):+.2f} points "
              f"(seeds {', '.join(f'{d:+.2f}' for d in delta)}) | "
              f"**{statistics.median(a['per_minute'] / b['per_minute'] for a, b in zip(rs, base)):.2f}** | "
              f"**{statistics.median(a['span'] / b['span'] for a, b in zip(rs, base)):.2f}** | "
              f"{statistics.median(a['cpu'] / b['cpu'] for a, b in zip(rs, base)):.2f} | "
              f"{statistics.median(a['trial_epochs'] / b['trial_epochs'] for a, b in zip(rs, base)):.2f} | | |")
    ratio = lambda p, b, f: statistics.median(f(x) / f(y) for x, y in zip(runs[p], runs[b]))  # noqa: E731
    if "none" in runs and "asha" in runs:
        delta = statistics.median(100 * (x["best"] - y["best"]) for x, y in zip(runs["asha"], runs["none"]))
        span = ratio("asha", "none", lambda r: r["span"])
        print(f"\nTarget: ASHA within 0.2 points of the no-pruning best at <= 1/2 of its device-seconds: "
              f"{delta:+.2f} points at {span:.2f} -> {'met' if delta >= -0.2 and span <= 0.5 else 'not met'}")
    if "packed-asha" in runs and "asha" in runs:
        speed = ratio("packed-asha", "asha", lambda r: r["per_minute"])
        print(f"Target: packed+ASHA >= 1.5x the trials per minute of unpacked ASHA: {speed:.2f}x -> "
              f"{'met' if speed >= 1.5 else 'not met'}")
    print("\nWhere the device-seconds went (median of seeds, seconds summed over a study's trials; packed trials do "
          "not time their parts, so only unpacked arms are shown):\n")
    print("| study | trial set-up | training | validation | rest of trial | between trials (ask/tell) | per trial fixed |")
    print("|---|---|---|---|---|---|---|")
    for p in [p for p in pruners if ARMS[p][1] is None]:
        rs = runs[p]
        fixed = med(rs, lambda r: (r["parts"]["setup"] + r["in_trial"] + r["between"]) / args.trials)
        train = med(rs, lambda r: r["parts"]["train"]) if rs[0]["parts"]["train"] else None
        print(f"| {p} | {med(rs, lambda r: r['parts']['setup']):.1f} | "
              f"{f'{train:.1f}' if train is not None else 'n/a'} | "
              f"{med(rs, lambda r: r['parts']['val']):.1f}{'' if train is not None else ' (train+val ' + format(med(rs, lambda r: r['parts']['epochs']), '.1f') + ')'} | "
              f"{med(rs, lambda r: r['in_trial']):.1f} | {med(rs, lambda r: r['between']):.1f} | {fixed:.2f} s |")
    if "none" in runs:
        print("\nWhat got pruned:")
        for p in pruners:
            if ARMS[p][0] != "none":
                for full, pruned in zip(runs["none"], runs[p]):
                    print(f"- {p}, {pruning_report(full, pruned)}")


if __name__ == "__main__":
    main()
