"""Benchmark: "data at any size": peak memory of every stage at 1x and 8x data, streaming vs resident training
throughput, and preparing a million tiny images.

Everything runs through the CLI, as a user would: `tuneline init PROJ --example cifar10 --data FOLDER` (an image
folder: data.source imagefolder), then `tuneline stage NAME -S ...` for fetch, prepare, train, evaluate and export,
each a subprocess in the project folder. While a stage runs, a thread here sums the RSS of its process and all
its descendants (DataLoader workers, DVC's helpers) every 50 ms and keeps the peak of the sum; wall time is
Popen to exit (interpreter start and imports included).

(1) Memory at 1x and 8x: a synthetic RGB image folder (JPEG, 64x64, 10 classes; a class-coloured square or
    disc on noise, so a model learns something; deterministic from --seed) of each --sizes count, streaming
    forced in every stage (`-S data.resident_max_mb=0`), one epoch over --train-images images
    (`-S train.images_per_epoch=N`) of a network cheap enough to expose the loader (bench_tiny:build below,
    written into each project: a 4x4 average pool and a 32-unit MLP), gates opened
    (this measures memory, not accuracy). Target, per stage: peak(8x) <= 1.25 x peak(1x) and < 2048 MB.
(2) Streaming vs resident training on the first size's project, one epoch over --train-images images each:
    `-S data.resident_max_mb=100000` (the split on the device) vs `=0` with `-S data.loader_workers=N`.
    images/s is the train history's `images_per_s` of that epoch (its seconds include validating the whole
    val split, the same in both), the best of --repeats interleaved runs per mode.
    Target: streaming >= 0.8 x resident, and resident >= 3,000 images/s.
(3) A folder of --tiny-count 8x8 RGB PNGs (10 classes): `tuneline stage fetch` and `prepare` with streaming
    forced, files/s and peak RSS of each.

Knobs the installed Tuneline may not know yet (data.resident_max_mb, train.images_per_epoch,
data.loader_workers): when a stage fails with a params validation error naming one, the bench prints a
line saying so and runs without it from then on (the results then say which knobs were in force).

Generated folders are kept under --scratch (default $TMPDIR/tuneline-bench-data) and reused when a rerun asks
for the same count and seed; projects are rebuilt every run. Disk: about 4 KB per generated file, plus
12 KB per 64x64 image for each of raw and prepared (400,000 images: ~1.6 GB of JPEGs + ~10 GB of stage
outputs; 1,000,000 tiny PNGs: ~4 GB).

    python bench/bench_data.py                                   # 50,000 and 400,000 images, 1M tiny
    python bench/bench_data.py --quick                           # 2,000 and 16,000, 20,000 tiny: a smoke test
    python bench/bench_data.py --sizes 50000 --tiny-count 0 --json /tmp/bench-data.json
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "prepare", "train", "evaluate", "export")
N_CLASSES = 10
CHUNK = 1000  # images per generator task: the unit of determinism (chunk k draws from rng(seed, k))
RATIO_TARGET, RSS_TARGET_MB = 1.25, 2048
THROUGHPUT_RATIO_TARGET, RESIDENT_FLOOR = 0.8, 3000
RESIDENT_ALL = 100_000  # data.resident_max_mb for "resident": larger than any split here

# Knobs of the data-at-any-size work; `tuneline stage` refuses unknown keys, so each is dropped (and said so)
# when the installed code does not know it.
STREAM_KEY, EPOCH_KEY, WORKERS_KEY = "data.resident_max_mb", "train.images_per_epoch", "data.loader_workers"
NEW_KNOBS = (STREAM_KEY, EPOCH_KEY, WORKERS_KEY)

# The network: cheap enough that the loader, not the model, sets the pace (>= 3,000 images/s resident on
# 2 cores). Written into each project folder (the stage imports `module:function` factories from there).
TINY_MODEL_MODULE = "bench_tiny"
TINY_MODEL_SOURCE = '''\
"""bench/bench_data.py's network: average-pool to about 16x16, then a 32-unit MLP. Cheap on purpose: the data
path, not the model, should set the pace (the class is a coloured shape: colour alone tells the classes apart)."""

import torch.nn as nn


def build(n_classes, in_channels, image_size, dropout=0.0, **kwargs):
    height, width = image_size
    pool = max(1, min(height, width) // 16)
    features = in_channels * (height // pool) * (width // pool)
    return nn.Sequential(nn.AvgPool2d(pool) if pool > 1 else nn.Identity(), nn.Flatten(),
                         nn.Linear(features, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, n_classes))
'''

# Distinct colours, one per class; even classes draw a square, odd ones a disc.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], dtype=np.int16)


# ---------------------------------------------------------------- the synthetic image folders


def _class_names(n_classes: int) -> list[str]:
    return [f"class{k:02d}" for k in range(n_classes)]


def draw_chunk(seed: int, chunk: int, count: int, side: int, n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Images chunk*CHUNK .. +count: uint8 [count, side, side, 3] and their labels (index % n_classes)."""
    rng = np.random.default_rng([seed, chunk])
    first = chunk * CHUNK
    labels = (np.arange(first, first + count) % n_classes).astype(np.int64)
    # Noise around a random background level, then the class's shape in its colour (jittered) at a random place.
    background = rng.integers(40, 216, size=(count, 1, 1, 3), dtype=np.int16)
    images = background + rng.integers(-40, 41, size=(count, side, side, 3), dtype=np.int16)
    yy, xx = np.mgrid[0:side, 0:side]
    radius = rng.uniform(side * 0.18, side * 0.32, size=count)
    centre = rng.uniform(side * 0.3, side * 0.7, size=(count, 2))
    jitter = rng.integers(-25, 26, size=(count, 3), dtype=np.int16)
    for i in range(count):
        dy, dx = yy - centre[i, 0], xx - centre[i, 1]
        if labels[i] % 2 == 0:
            mask = (np.abs(dy) <= radius[i]) & (np.abs(dx) <= radius[i])
        else:
            mask = dy * dy + dx * dx <= radius[i] * radius[i]
        images[i][mask] = PALETTE[labels[i] % len(PALETTE)] + jitter[i]
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _write_chunk(task: tuple) -> int:
    from PIL import Image

    folder, seed, chunk, count, side, ext, n_classes = task
    images, labels = draw_chunk(seed, chunk, count, side, n_classes)
    names = _class_names(n_classes)
    options = {"quality": 90} if ext == "jpg" else {"compress_level": 1}
    for i, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels, "RGB").save(Path(folder) / names[label] / f"{chunk * CHUNK + i:07d}.{ext}", **options)
    return count


def generate_folder(folder: Path, count: int, side: int = 64, ext: str = "jpg", seed: int = 0,
                    n_classes: int = N_CLASSES, processes: int | None = None, quiet: bool = False) -> dict:
    """A class-folder image set at `folder` (folder/classNN/NNNNNNN.ext); an existing complete one with the same
    settings (its .bench-data.json) is reused. Returns {"count", "seconds", "reused", "disk_mb"}."""
    folder = Path(folder)
    marker = folder / ".bench-data.json"  # hidden: the image-folder reader ignores it
    wanted = {"count": count, "side": side, "ext": ext, "seed": seed, "classes": n_classes, "chunk": CHUNK}
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == wanted:
        return {**json.loads(marker.read_text())["result"], "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    for name in _class_names(n_classes):
        (folder / name).mkdir(parents=True)
    tasks = [(str(folder), seed, k, min(CHUNK, count - k * CHUNK), side, ext, n_classes)
             for k in range((count + CHUNK - 1) // CHUNK)]
    started, done = time.perf_counter(), 0
    processes = processes or os.cpu_count() or 1
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for n in pool.imap_unordered(_write_chunk, tasks):
            done += n
            if not quiet and (done % max(CHUNK, count // 10 // CHUNK * CHUNK) == 0 or done == count):
                print(f"  generating {folder.name}: {done:,}/{count:,} ({done / (time.perf_counter() - started):,.0f} "
                      "files/s)", flush=True)
    seconds = time.perf_counter() - started
    result = {"count": count, "seconds": round(seconds, 1), "disk_mb": round(_disk_mb(folder), 1)}
    marker.write_text(json.dumps({"settings": wanted, "result": result}))
    return {**result, "reused": False}


def _disk_mb(path: Path) -> float:
    """Allocated size (du), not the byte count: small files take a block each."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0]) / 1024 if out.returncode == 0 and out.stdout else float("nan")


# ---------------------------------------------------------------- running stages, watching their memory


class StageFailed(RuntimeError):
    pass


@dataclass
class StageRun:
    stage: str
    label: str  # the data set / run it belongs to, e.g. "50,000"
    rc: int = 0
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0  # sampled every ~0.5 s (reading smaps is slow): a lower bound of the true peak
    max_processes: int = 0
    load_average: float | None = None  # 1-minute load average as the stage started (other jobs on the cores)
    overrides: dict = field(default_factory=dict)
    log: str = ""


def _tuneline() -> list[str]:
    """This interpreter's `tuneline` console script (the venv's), else the one on PATH."""
    script = Path(sys.executable).parent / "tuneline"
    return [str(script)] if script.exists() else [shutil.which("tuneline") or "tuneline"]


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):  # each project its own embedded Prefect
        env.pop(key, None)
    return env


def watch_tree(proc: subprocess.Popen, interval: float = 0.05) -> dict:
    """Sample the RSS summed over `proc` and its descendants until it exits; the peaks (MB) and process count."""
    peak = {"rss": 0, "pss": 0, "procs": 0}
    try:
        top = psutil.Process(proc.pid)
    except psutil.Error:
        return {"rss_mb": 0.0, "pss_mb": 0.0, "procs": 0}
    tick = 0
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
        except psutil.Error:
            break
        rss = pss = 0
        for p in tree:
            try:
                rss += p.memory_info().rss
                if tick % 10 == 0:
                    pss += p.memory_full_info().pss
            except psutil.Error:  # exited between listing and reading
                pass
        peak["rss"], peak["procs"] = max(peak["rss"], rss), max(peak["procs"], len(tree))
        if tick % 10 == 0:
            peak["pss"] = max(peak["pss"], pss)
        tick += 1
        time.sleep(interval)
    return {"rss_mb": peak["rss"] / 2**20, "pss_mb": peak["pss"] / 2**20, "procs": peak["procs"]}


def unknown_knob(output: str, keys) -> str | None:
    """The knob among `keys` that a params validation error in `output` names as unknown, if any.

    Today's message: `tuneline: stage failed: unknown key 'data.resident_max_mb': valid keys are data.source, ...`;
    only the part of a line before "valid keys" counts (the list of valid keys names known ones)."""
    for line in output.splitlines():
        head = re.split(r"valid keys", line, flags=re.IGNORECASE)[0]
        for key in keys:
            if key in head and re.search(r"unknown|extra (inputs|fields?)|not permitted|unrecognized", head, re.IGNORECASE):
                return key
    return None


class Runner:
    """Runs stages with overrides; remembers the new knobs the installed code refused and leaves them out."""

    def __init__(self, verbose: bool = False):
        self.refused: set[str] = set()
        self.accepted: set[str] = set()
        self.notes: list[str] = []
        self.verbose = verbose

    def known(self, key: str) -> bool | None:
        """True/False once a stage has accepted/refused the key; None before."""
        return True if key in self.accepted else False if key in self.refused else None

    def run(self, project: Path, stage: str, overrides: dict, label: str, log_dir: Path) -> StageRun:
        log_dir.mkdir(parents=True, exist_ok=True)
        while True:
            used = {k: v for k, v in overrides.items() if k not in self.refused}
            sets = [arg for k, v in used.items() for arg in ("-S", f"{k}={_yaml(v)}")]
            log_path = log_dir / f"{stage}-{label.replace(',', '').replace(' ', '-')}.log"
            print(f"  {label:>12s}  {stage:9s} ...", end="", flush=True)
            load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
            with open(log_path, "w") as log:
                started = time.perf_counter()
                proc = subprocess.Popen([*_tuneline(), "stage", stage, *sets], cwd=project, env=stage_env(),
                                        stdout=log, stderr=subprocess.STDOUT)
                memory: dict = {}
                watcher = threading.Thread(target=lambda: memory.update(watch_tree(proc)), daemon=True)
                watcher.start()
                rc = proc.wait()
                wall = time.perf_counter() - started
                watcher.join()
            output = log_path.read_text(errors="replace")
            if rc != 0:
                key = unknown_knob(output, [k for k in used if k in NEW_KNOBS])
                if key is not None:
                    self.refused.add(key)
                    note = (f"NOTE: the installed Tuneline does not know `{key}` (params validation: unknown key): "
                            f"running without it from here on")
                    self.notes.append(note)
                    print(f" refused {key}\n  {note}", flush=True)
                    continue
                tail = "\n".join(output.strip().splitlines()[-15:])
                print(f" FAILED (exit {rc}, {wall:.1f} s); log {log_path}:\n{tail}", flush=True)
                raise StageFailed(f"{stage} ({label}): exit {rc}: {_last_error(output)}")
            self.accepted.update(k for k in used if k in NEW_KNOBS)
            run = StageRun(stage, label, rc, round(wall, 2), round(memory.get("rss_mb", 0.0), 1),
                           round(memory.get("pss_mb", 0.0), 1), memory.get("procs", 0), load, used, str(log_path))
            print(f" {run.wall_s:7.1f} s  peak RSS {run.peak_rss_mb:7.0f} MB  ({run.max_processes} process"
                  f"{'es' if run.max_processes != 1 else ''})", flush=True)
            if self.verbose:
                print("\n".join("      | " + line for line in output.strip().splitlines()[-8:]))
            return run


def _yaml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _last_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "failed" in line or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def init_project(project: Path, folder: Path) -> float:
    """`tuneline init PROJECT --example cifar10 --data FOLDER` (a fresh project: the old one and its DVC remote go),
    plus the bench's network module; returns seconds. The cifar10 example is the one whose data.source is
    imagefolder: with the default (mnist) example, --data names the MNIST mirror."""
    for old in (project, project.with_name(project.name + "-dvc-remote")):
        shutil.rmtree(old, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([*_tuneline(), "init", str(project), "--example", "cifar10", "--data", str(folder)],
                            env=stage_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise StageFailed(f"tuneline init {project}: exit {result.returncode}: {_last_error(result.stdout + result.stderr)}")
    (project / f"{TINY_MODEL_MODULE}.py").write_text(TINY_MODEL_SOURCE)
    return time.perf_counter() - started


def common_overrides(args, stream: bool = True) -> dict:
    """What every stage of the memory runs gets: streaming forced, a cheap 1-epoch training, open gates."""
    o = {STREAM_KEY: 0 if stream else RESIDENT_ALL,
         "project.name": "bench-data", "tune.enabled": False,
         "model.arch": args.arch, "model.dropout": 0.0,
         "train.epochs": 1, EPOCH_KEY: args.train_images, "train.batch_size": args.batch_size,
         "train.optimizer": "adam", "train.lr": 3e-3, "train.scheduler": "none", "train.label_smoothing": 0.0,
         "train.augment_flip": False, "train.augment_rotate_deg": 0.0, "train.augment_translate": 0.0,
         "train.augment_scale": 0.0, "train.compile": False, "train.resume": False,
         "train.channels_last": False,  # no convolutions in the default network
         "train.early_stopping_patience": 0,
         # Gates open: this bench measures memory and speed; the model is not meant to be good.
         "gate.min_accuracy": 0.0, "gate.min_class_recall": 0.0, "gate.max_ece": 1.0,
         "gate.max_latency_p99_ms": 10_000.0, "gate.max_size_mb": 10_000.0,
         "export.latency_runs": args.latency_runs}
    if args.device:
        o["train.device"] = args.device
    return o


def read_history(project: Path) -> list[dict]:
    """The train stage's history CSV (paths.history of the project's params.yaml)."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text()) or {}
    path = project / ((params.get("paths") or {}).get("history") or "metrics/train_history.csv")
    with open(path) as handle:
        return list(csv.DictReader(handle))


def images_per_s(project: Path, log_path: str) -> tuple[float | None, str]:
    """The last epoch's images/s: the history CSV's images_per_s, else the log's `... N img/s` line."""
    try:
        rows = read_history(project)
        if rows and rows[-1].get("images_per_s"):
            return float(rows[-1]["images_per_s"]), "history images_per_s"
    except (OSError, ValueError, KeyError):
        pass
    found = re.findall(r"([\d.]+) img/s", Path(log_path).read_text(errors="replace"))
    return (float(found[-1]), "log img/s") if found else (None, "not found")


def prepared_counts(project: Path) -> dict:
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text()) or {}
    manifest = project / ((params.get("paths") or {}).get("prepared") or "data/prepared") / "manifest.json"
    try:
        return dict(json.loads(manifest.read_text()).get("counts", {}))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- the header and the tables


def header(args) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": version("torch"), "numpy": version("numpy"),
            "pillow": version("pillow"), "tuneline": version("tuneline"),
            "git": rev + (" (+ uncommitted changes)" if dirty else ""),
            "platform": platform.platform(), "argv": sys.argv[1:]}


def print_header(h: dict) -> None:
    print(f"bench_data: {h['date']}; {h['cpu']}, {h['cpus']} CPUs ({h['cpus_usable']} usable), {h['ram_gib']} GiB RAM; "
          f"load average {h['load_average']}")
    print(f"python {h['python']}, torch {h['torch']}, numpy {h['numpy']}, pillow {h['pillow']}, tuneline {h['tuneline']}; "
          f"git {h['git']}; {h['platform']}", flush=True)


def table(rows: list[list], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def knob_state(runner: Runner, key: str) -> str:
    state = runner.known(key)
    return "in force" if state else "UNKNOWN to this Tuneline: not applied" if state is False else "not used"


# ---------------------------------------------------------------- the three parts


def memory_part(args, runner: Runner, results: dict) -> None:
    for count in args.sizes:
        label = f"{count:,}"
        folder = args.scratch / f"rgb64-{count}-seed{args.seed}"
        made = generate_folder(folder, count, 64, "jpg", args.seed)
        print(f"folder {folder}: {count:,} JPEGs, {made['disk_mb']:,.0f} MB on disk, "
              + ("reused" if made["reused"] else f"generated in {made['seconds']:.1f} s"), flush=True)
        project = args.scratch / f"proj-{count}"
        seconds = init_project(project, folder)
        print(f"project {project}: tuneline init {seconds:.1f} s", flush=True)
        entry = results["sizes"].setdefault(label, {"count": count, "folder": made, "stages": {}})
        for stage in STAGES:
            try:
                run = runner.run(project, stage, common_overrides(args), label, project / "bench-logs")
            except StageFailed as exc:
                entry["error"], entry["failed_stage"] = str(exc), stage
                results["failures"].append(str(exc))
                break
            entry["stages"][stage] = asdict(run)
            if stage == "prepare":
                entry["prepared_counts"] = prepared_counts(project)
            if stage == "train":
                entry["train_images_per_s"], _ = images_per_s(project, run.log)


def throughput_part(args, runner: Runner, results: dict) -> None:
    count = args.sizes[0]
    project = args.scratch / f"proj-{count}"
    entry = results["sizes"].get(f"{count:,}", {})
    if "train" not in entry.get("stages", {}):
        print(f"throughput: skipped (the {count:,} project did not get through train)")
        return
    out = {"project": str(project), "images": count, "repeats": args.repeats}
    runs: dict[str, list[dict]] = {"resident": [], "streaming": []}
    for repeat in range(1, args.repeats + 1):  # interleaved, so a busy spell on the shared cores hits both
        for mode in runs:
            overrides = common_overrides(args, stream=(mode == "streaming"))
            if mode == "streaming" and args.loader_workers is not None:
                overrides[WORKERS_KEY] = args.loader_workers
            label = mode if args.repeats == 1 else f"{mode} {repeat}"
            try:
                run = runner.run(project, "train", overrides, label, project / "bench-logs")
            except StageFailed as exc:
                results["failures"].append(str(exc))
                return
            rate, source = images_per_s(project, run.log)
            rows = read_history(project)
            seconds = float(rows[-1]["seconds"]) if rows else None
            runs[mode].append({"images_per_s": rate, "source": source, "epoch_seconds": seconds,
                               "epoch_images": round(rate * seconds) if rate and seconds else None,
                               "wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb,
                               "max_processes": run.max_processes, "load_average": run.load_average,
                               "overrides": {k: v for k, v in run.overrides.items() if k in NEW_KNOBS}})
    for mode, done in runs.items():  # the best of the repeats (the least disturbed by other jobs)
        best = max(done, key=lambda r: r["images_per_s"] or 0)
        out[mode] = {**best, "all_images_per_s": [r["images_per_s"] for r in done],
                     "all_load_average": [r["load_average"] for r in done]}
    workers_known = runner.known(WORKERS_KEY)
    out["loader_workers"] = (args.loader_workers if workers_known else
                             "the code's default (data.loader_workers unknown)" if workers_known is False else "not set")
    r, s = out["resident"]["images_per_s"], out["streaming"]["images_per_s"]
    out["ratio"] = round(s / r, 3) if r and s else None
    out["pass"] = bool(out["ratio"] is not None and out["ratio"] >= THROUGHPUT_RATIO_TARGET and r >= RESIDENT_FLOOR)
    results["throughput"] = out


def tiny_part(args, runner: Runner, results: dict) -> None:
    count = args.tiny_count
    folder = args.scratch / f"png8-{count}-seed{args.seed}"
    made = generate_folder(folder, count, 8, "png", args.seed)
    print(f"folder {folder}: {count:,} 8x8 PNGs, {made['disk_mb']:,.0f} MB on disk, "
          + ("reused" if made["reused"] else f"generated in {made['seconds']:.1f} s"), flush=True)
    project = args.scratch / f"proj-tiny-{count}"
    init_project(project, folder)
    out = {"count": count, "folder": made, "stages": {}}
    for stage in ("fetch", "prepare"):
        try:
            run = runner.run(project, stage, common_overrides(args), f"tiny {count:,}", project / "bench-logs")
        except StageFailed as exc:
            results["failures"].append(str(exc))
            break
        out["stages"][stage] = {**asdict(run), "files_per_s": round(count / run.wall_s)}
    results["tiny"] = out


def report(args, runner: Runner, results: dict) -> None:
    print()
    print(f"Settings: streaming forced ({STREAM_KEY}=0): {knob_state(runner, STREAM_KEY)}; "
          f"{EPOCH_KEY}={args.train_images}: {knob_state(runner, EPOCH_KEY)}; model {args.arch}, "
          f"batch {args.batch_size}, 1 epoch; RSS = peak of the sum over each stage's process tree, sampled every 50 ms")
    for note in runner.notes:
        print(note)

    labels = list(results["sizes"])
    rows = []
    for label in labels:
        entry = results["sizes"][label]
        counts = entry.get("prepared_counts") or {}
        for stage in STAGES:
            run = entry["stages"].get(stage)
            if run is None:
                rows.append([stage, label, "-", "-", "-", "-",
                             "FAILED" if entry.get("failed_stage") == stage else "skipped"])
                continue
            extra = ""
            if stage == "prepare" and counts:
                extra = "splits " + "/".join(f"{counts.get(s, 0):,}" for s in ("train", "val", "test"))
            if stage == "train" and entry.get("train_images_per_s"):
                extra = f"{entry['train_images_per_s']:,.0f} img/s"
            rows.append([stage, label, f"{run['peak_rss_mb']:,.0f}", f"{run['peak_pss_mb']:,.0f}",
                         run["max_processes"], f"{run['wall_s']:.1f}", extra])
    streaming = ("streaming forced" if runner.known(STREAM_KEY) else
                 f"{STREAM_KEY} unknown: the installed code's own data path" if runner.known(STREAM_KEY) is False
                 else "streaming")
    print()
    print(f"Peak memory per stage ({streaming})")
    print(table(rows, ["stage", "images", "peak RSS MB (tree)", "peak PSS MB (~0.5 s samples)", "processes",
                       "wall s", "notes"]))

    if len(labels) >= 2:
        small, big = results["sizes"][labels[0]], results["sizes"][labels[-1]]
        factor = big["count"] / small["count"]
        rows, verdicts = [], {}
        for stage in STAGES:
            a, b = small["stages"].get(stage), big["stages"].get(stage)
            if not a or not b:
                rows.append([stage, "-", "-", "-", "n/a"])
                continue
            ratio = b["peak_rss_mb"] / a["peak_rss_mb"] if a["peak_rss_mb"] else float("inf")
            ok = ratio <= RATIO_TARGET and b["peak_rss_mb"] < RSS_TARGET_MB
            verdicts[stage] = {"ratio": round(ratio, 3), "pass": ok}
            rows.append([stage, f"{a['peak_rss_mb']:,.0f}", f"{b['peak_rss_mb']:,.0f}", f"{ratio:.2f}x",
                         "PASS" if ok else "FAIL"])
        results["memory_verdicts"] = verdicts
        print()
        print(f"Memory growth {labels[-1]} vs {labels[0]} images ({factor:g}x data); target <= {RATIO_TARGET}x and "
              f"< {RSS_TARGET_MB} MB at {labels[-1]}")
        print(table(rows, ["stage", f"RSS MB at {labels[0]}", f"RSS MB at {labels[-1]}", "ratio", "verdict"]))

    t = results.get("throughput")
    if t:
        print()
        print(f"Training throughput on the {t['images']:,}-image project, 1 epoch over {args.train_images:,} images "
              f"({knob_state(runner, EPOCH_KEY)}); loader workers: {t['loader_workers']}")
        rows = []
        for mode in ("resident", "streaming"):
            m = t[mode]
            rows.append([mode, f"{m['images_per_s']:,.0f}" if m["images_per_s"] else "-",
                         " ".join(f"{v:,.0f}" for v in m["all_images_per_s"] if v),
                         " ".join(f"{v:.1f}" for v in m["all_load_average"] if v is not None),
                         f"{m['epoch_images']:,}" if m["epoch_images"] else "-",
                         f"{m['epoch_seconds']:.1f}" if m["epoch_seconds"] else "-", f"{m['wall_s']:.1f}",
                         f"{m['peak_rss_mb']:,.0f}", m["max_processes"],
                         ", ".join(f"{k}={v}" for k, v in m["overrides"].items()) or "(none)"])
        print(table(rows, ["training", "images/s (best, history)", f"all {t['repeats']} runs",
                           "load avg at start", "images in epoch (~)", "epoch s", "stage wall s",
                           "peak RSS MB", "processes", "knobs in force"]))
        ratio = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "n/a"
        verdict = "PASS" if t["pass"] else "FAIL"
        if runner.known(STREAM_KEY) is False:
            verdict += f" (not meaningful: {STREAM_KEY} is unknown, so both runs took the same data path)"
        print(f"streaming / resident = {ratio} (target >= {THROUGHPUT_RATIO_TARGET}x, resident >= {RESIDENT_FLOOR:,} "
              f"images/s): {verdict}")

    tiny = results.get("tiny")
    if tiny:
        print()
        print(f"{tiny['count']:,} tiny images (8x8 RGB PNG, 10 classes), {streaming}")
        rows = [[stage, f"{r['files_per_s']:,}", f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:,.0f}",
                 f"{r['peak_pss_mb']:,.0f}", r["max_processes"]] for stage, r in tiny["stages"].items()]
        print(table(rows, ["stage", "files/s (count / stage wall)", "wall s", "peak RSS MB (tree)", "peak PSS MB",
                           "processes"]))

    if results["failures"]:
        print()
        print("FAILURES:")
        for failure in results["failures"]:
            print(f"  {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image counts (default 50000 400000; "
                        "the memory ratio compares the last with the first)")
    parser.add_argument("--tiny-count", type=int, default=None, help="8x8 images to fetch and prepare (default "
                        "1000000; 0 skips)")
    parser.add_argument("--train-images", type=int, default=None, help="images per training epoch "
                        f"({EPOCH_KEY}; default 20000)")
    parser.add_argument("--loader-workers", type=int, default=2, help=f"{WORKERS_KEY} for the streaming side of the "
                        "throughput comparison (default 2; -1 leaves it unset)")
    parser.add_argument("--arch", default=f"{TINY_MODEL_MODULE}:build", help="model.arch (default: the bench's own "
                        "tiny network, written into each project)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="train.device (default: the params' auto)")
    parser.add_argument("--latency-runs", type=int, default=None, help="export.latency_runs (default 50; quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="throughput: train runs per mode, interleaved; the "
                        "best counts (default 3; quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "tuneline-bench-data",
                        help="generated folders (kept and reused) and projects (rebuilt)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "throughput", "tiny"],
                        help="parts to leave out (throughput trains on the memory part's first project: skipping "
                        "memory skips it too)")
    parser.add_argument("--quick", action="store_true", help="sizes 2000 16000, tiny 20000, 1,000 training images")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="show the tail of each stage's log")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([2000, 16000] if args.quick else [50_000, 400_000])
    args.tiny_count = args.tiny_count if args.tiny_count is not None else (20_000 if args.quick else 1_000_000)
    args.train_images = args.train_images or (1000 if args.quick else 20_000)
    args.latency_runs = args.latency_runs or (20 if args.quick else 50)
    args.repeats = max(1, args.repeats or (1 if args.quick else 3))
    args.loader_workers = None if args.loader_workers is not None and args.loader_workers < 0 else args.loader_workers
    args.scratch = args.scratch.resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    h = header(args)
    print_header(h)
    print(f"scratch {args.scratch}; sizes {', '.join(f'{n:,}' for n in args.sizes)}; tiny {args.tiny_count:,}; "
          f"training {args.train_images:,} images/epoch", flush=True)
    runner = Runner(verbose=args.verbose)
    results: dict = {"header": h, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "sizes": {}, "failures": []}
    if "memory" not in args.skip:
        memory_part(args, runner, results)
    if "throughput" not in args.skip and "memory" not in args.skip:
        throughput_part(args, runner, results)
    if "tiny" not in args.skip and args.tiny_count > 0:
        try:
            tiny_part(args, runner, results)
        except StageFailed as exc:
            results["failures"].append(str(exc))
    results["knobs"] = {key: runner.known(key) for key in NEW_KNOBS}
    results["notes"] = runner.notes
    results["wall_s"] = round(time.perf_counter() - started, 1)
    report(args, runner, results)
    print(f"\nbench_data: {results['wall_s']:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"results: {args.json}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
