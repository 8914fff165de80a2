"""Stage `train`: prepared tensors + config -> checkpoint + per-epoch history.

Speed comes from data layout, not cleverness: the splits live on the device as uint8 tensors and each
batch is a slice of a random permutation (no per-sample DataLoader: the seed article's recipe spends
most of an epoch in Python). Augmentation runs on whole batches on the device; bf16 autocast and
channels_last on CUDA. Losses are summed on the device and read once per epoch, so the step loop
never waits for the host.

Every epoch ends with an atomic resume checkpoint (model, optimizer, schedule, RNG states, best metric,
history); a rerun of the same config after a crash continues from it, and in deterministic mode ends
with exactly the metrics of an uninterrupted run.

Under `torchrun` the same loop trains with DistributedDataParallel (tasks/train/distributed.py): each rank
takes its share of every global batch, rank 0 writes; a checkpoint resumes at any world size.

One loop, two strategies: `train_epochs` runs the epochs (data order, augmentation, divergence checks,
validation, history records, early stopping, best weights) for a strategy that holds either one model
(`OneModel`, here: run_train) or K stacked models (`tasks/train/packed.py`: packed tuning trials). A
strategy only trains a batch, validates and hands out weights; the optimizer math of both is in
tasks/train/optim.py.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from tasks.atomic import staged_file
from tasks.data.augment import augment_batch
from tasks.model.checkpoint import save_checkpoint
from tasks.config import ModelConfig, TrainConfig
from tasks.train.distributed import (DistContext, all_reduce_sum, barrier, context, device_for,
                                     process_group)
from tasks.lineage import Lineage
from tasks.model.architectures import Classifier, ModelArgs, build_model
from tasks.train.optim import LRSchedule, build_optimizer, optimizer_step
from tasks.data.prepare import load_manifest, load_split

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "images_per_s")
RESUME_FORMAT = "tuneline.resume/1"
EpochCallback = Callable[[dict, Classifier], None]


class DivergedError(RuntimeError):
    """Training produced a NaN or infinite loss: the model is unusable and was not saved."""


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    history_path: Path
    history: list[dict]
    best_val_accuracy: float
    device: str
    stopped_early: bool = False
    resumed_from_epoch: int = 0


def resolve_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; an explicit 'cuda' without a GPU is an error, not a fallback."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast where it pays (CUDA) or where asked; plain fp32 otherwise."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


@torch.no_grad()
def predict_logits(model: Classifier, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fp32 logits for uint8 images [N, H, W] (on the model's device), in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size].unsqueeze(1).float()).float()
                      for i in range(0, len(images), batch_size)])


def _write_history(path: Path, history: list[dict]) -> None:
    with staged_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def read_history(path: Path) -> list[dict]:
    """The per-epoch records _write_history wrote, with their numbers as numbers again."""
    with open(path, newline="") as handle:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _resume_key(model_cfg: ModelConfig, cfg: TrainConfig, manifest: dict) -> str:
    """A checkpoint is only resumed by a run of the same model, training config and data."""
    payload = {"model": model_cfg.model_dump(), "train": cfg.model_dump(exclude={"resume"}), "data": manifest["files"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _determinism(enabled: bool):
    """Deterministic kernels for the duration of one run (a process-wide switch, so it is restored after)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


class _Progress:
    """A rich progress bar per epoch on a terminal; nothing (just the per-epoch log line) otherwise."""

    def __init__(self, enabled: bool, steps: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=True)
        self.steps = steps

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def epoch(self, epoch: int, epochs: int):
        if self.bar:
            self.task = self.bar.add_task(f"epoch {epoch}/{epochs}", total=self.steps)

    def advance(self):
        if self.bar:
            self.bar.advance(self.task)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()



# --- The loop both strategies share -------------------------------------------------------------------------

def build_member(model_cfg: ModelConfig, train_cfg: TrainConfig, args: ModelArgs) -> Classifier:
    """The model a run starts from: seeded with train.seed, then built (same seed, same initial weights)."""
    torch.manual_seed(train_cfg.seed)
    return build_model(replace(args, dropout=model_cfg.dropout))


def load_data(prepared_dir: Path, device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """The manifest and the train and val splits, on `device` (uint8 images, int64 labels)."""
    manifest = load_manifest(prepared_dir)
    train_x, train_y = (t.to(device) for t in load_split(prepared_dir, "train"))
    val_x, val_y = (t.to(device) for t in load_split(prepared_dir, "val"))
    return manifest, train_x, train_y, val_x, val_y


def batch_starts(n_train: int, batch_size: int, world_size: int = 1) -> list[int]:
    # Batches of one are skipped: batch norm cannot normalise a single sample (nor a rank's share of two).
    return [s for s in range(0, n_train, batch_size) if min(batch_size, n_train - s) >= 2 * world_size]


def diverged(train_loss: float, cfg: TrainConfig, n_classes: int, epoch: int, lr: float) -> str | None:
    """Why the epoch's train loss means the model diverged, or None."""
    # A finite but astronomically large loss is divergence too: far worse than guessing uniformly.
    if math.isfinite(train_loss) and train_loss <= cfg.divergence_factor * math.log(n_classes):
        return None
    return (f"train: loss diverged to {train_loss:.3g} in epoch {epoch} (lr {lr:g}, optimizer {cfg.optimizer}): "
            "lower train.lr or change the optimizer")


@dataclass
class Trainee:
    """One model's way through the loop: its config, callbacks and everything the loop tracks for it."""

    train: TrainConfig
    on_epoch: Callable[[dict], bool | None] | None = None  # after each validation; a true result stops it (pruned)
    on_end: Callable[["Trainee"], None] | None = None  # once, when it completes, is pruned or diverges
    keep_state: bool = False  # hand out its final weights (its best epoch's under train.restore_best) as `state`
    track_best: bool = True  # copy the best epoch's weights as they appear (train.restore_best needs them)
    history: list[dict] = field(default_factory=list)  # HISTORY_FIELDS per epoch
    best_metric: float | None = None
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    status: str = "running"  # running | complete | pruned | diverged
    reason: str = ""  # why it diverged
    stopped_early: bool = False
    state: dict[str, torch.Tensor] | None = None

    def improved(self, val_accuracy: float, val_loss: float) -> bool:
        """Early-stopping bookkeeping for this epoch's metrics; true when they are the best so far."""
        cfg = self.train
        higher_is_better = cfg.early_stopping_metric == "val_accuracy"
        metric = val_accuracy if higher_is_better else val_loss
        best = self.best_metric
        if best is None or (metric - best if higher_is_better else best - metric) > cfg.early_stopping_min_delta:
            self.best_metric, self.bad_epochs = metric, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def patience_spent(self) -> bool:
        return bool(self.train.early_stopping_patience) and self.bad_epochs >= self.train.early_stopping_patience


class Strategy(Protocol):
    """How the loop's models are held and stepped: one model (OneModel) or K stacked (packed._Pack)."""

    size: int  # models (rows) still training
    diverged_note: str  # appended to a divergence reason: what happens next

    def begin_epoch(self) -> list[float]: ...  # train mode; each row's lr at the epoch's start
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...  # one update; per-row data losses [K]
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[list, list]: ...
    def after_epoch(self, row: int, val_accuracy: float) -> None: ...  # per-epoch schedules (plateau)
    def weights(self, row: int) -> dict[str, torch.Tensor]: ...  # a copy of a row's state dict
    def keep(self, rows: list[int]) -> None: ...  # drop every other row


@dataclass
class EpochData:
    """The splits on the device and how each epoch walks them (shared by every model of the loop)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    n_classes: int
    cfg: TrainConfig  # batch size, augmentation, eval batch size: shared by every model
    generator: torch.Generator  # the batch order (the same on every rank)
    augment_generator: torch.Generator
    ctx: DistContext = DistContext()

    @property
    def starts(self) -> list[int]:
        return batch_starts(len(self.train_y), self.cfg.batch_size, self.ctx.world_size)


def train_epochs(strategy: Strategy, trainees: list[Trainee], data: EpochData, name: str, first_epoch: int = 1,
                 progress: _Progress | None = None, after_epoch: Callable[[int], None] | None = None) -> None:
    """Train every running trainee (row r of `strategy` is the r-th of them) until each completes, stops early,
    is pruned or diverges; each ends with its status set and `on_end` called. `after_epoch(epoch)` runs after
    each epoch's bookkeeping while any trainee is still in it (run_train writes its resume checkpoint there).
    """
    progress = progress or _Progress(False, 0)
    live = [i for i, t in enumerate(trainees) if t.status == "running"]  # the trainee of each row
    n_train, starts, cfg, ctx = len(data.train_y), data.starts, data.cfg, data.ctx
    max_epochs = max(trainees[i].train.epochs for i in live) if live else 0

    def finish(i: int, row: int, status: str, reason: str = "") -> None:
        t = trainees[i]
        t.status, t.reason, t.stopped_early = status, reason, status == "complete" and t.patience_spent
        if t.keep_state and status != "diverged":
            t.state = t.best_state if t.train.restore_best and t.best_state is not None else strategy.weights(row)
        if t.on_end is not None:
            t.on_end(t)

    def compact(keep_rows: list[int], *row_lists: list) -> None:
        if len(keep_rows) != len(live):
            if keep_rows:
                strategy.keep(keep_rows)
            for values in (live, *row_lists):
                values[:] = [values[r] for r in keep_rows]

    for epoch in range(first_epoch, max_epochs + 1):
        if not live:
            break
        started = time.perf_counter()
        lrs = strategy.begin_epoch()
        progress.epoch(epoch, max_epochs)
        order = torch.randperm(n_train, device=data.train_x.device, generator=data.generator)
        loss_sum = torch.zeros(len(live), device=data.train_x.device)  # summed on the device: no host sync per step
        for start in starts:
            idx = order[start:start + cfg.batch_size][ctx.rank::ctx.world_size]  # this rank's share
            x = data.train_x[idx].unsqueeze(1).float()
            x = augment_batch(x, cfg.augment_rotate_deg, cfg.augment_translate, cfg.augment_scale, data.augment_generator)
            loss_sum += strategy.step(x, data.train_y[idx]) * len(idx)
            progress.advance()
        train_losses = [float(v) / n_train for v in all_reduce_sum(loss_sum, ctx).tolist()]

        # Divergence is judged per model; a diverged model leaves before validation, the others go on.
        keep_rows = []
        for row, i in enumerate(list(live)):
            reason = diverged(train_losses[row], trainees[i].train, data.n_classes, epoch, lrs[row])
            if reason:
                log.info("%s: %s", name, reason)
                finish(i, row, "diverged", f"{reason}{strategy.diverged_note}")
            else:
                keep_rows.append(row)
        compact(keep_rows, train_losses, lrs)
        if not live:
            break

        # Every rank validates the whole split (identical weights -> identical numbers), so early stopping
        # and the plateau schedule decide the same on all ranks without another exchange.
        val_losses, val_accuracies = strategy.evaluate(data.val_x, data.val_y, cfg.eval_batch_size)
        seconds = time.perf_counter() - started
        keep_rows = []
        for row, i in enumerate(list(live)):
            t = trainees[i]
            strategy.after_epoch(row, val_accuracies[row])
            t.history.append({"epoch": epoch, "train_loss": round(train_losses[row], 6),
                              "val_loss": round(val_losses[row], 6), "val_accuracy": round(val_accuracies[row], 6),
                              "lr": lrs[row], "seconds": round(seconds, 3), "images_per_s": round(n_train / seconds, 1)})
            stop = bool(t.on_epoch(t.history[-1])) if t.on_epoch is not None else False
            if t.improved(val_accuracies[row], val_losses[row]) and t.track_best and t.train.restore_best:
                t.best_state = strategy.weights(row)
            if t.patience_spent:
                log.info("%s: early stop after epoch %d: %s did not improve for %d epoch(s) (best %.4f)", name, epoch,
                         t.train.early_stopping_metric, t.bad_epochs, t.best_metric)
            if stop:
                finish(i, row, "pruned")
            elif t.patience_spent or epoch >= t.train.epochs:
                finish(i, row, "complete")
            else:
                keep_rows.append(row)
        if len(val_accuracies) == 1:
            h = trainees[live[0]].history[-1]
            log.info("%s: epoch %d/%d train_loss %.4f val_loss %.4f val_acc %.4f lr %.3g %.1fs %.0f img/s", name, epoch,
                     max_epochs, h["train_loss"], h["val_loss"], h["val_accuracy"], h["lr"], seconds, n_train / seconds)
        else:
            log.info("%s: epoch %d/%d, %d model(s), %.1fs, val_acc %s", name, epoch, max_epochs, len(live), seconds,
                     " ".join(f"{a:.4f}" for a in val_accuracies))
        if after_epoch is not None:
            after_epoch(epoch)
        compact(keep_rows)


# --- One model: run_train ------------------------------------------------------------------------------------

def _l1_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    # Weights of conv and linear layers only: penalising biases and norm scales does not sparsify anything.
    return [p for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1]


class OneModel:
    """The one-model strategy: a module (DDP-wrapped under torchrun, optionally compiled) and a torch optimizer."""

    size = 1
    diverged_note = "; no model was saved"

    def __init__(self, model: Classifier, cfg: TrainConfig, ctx: DistContext, device: torch.device, steps_per_epoch: int):
        self.model, self.cfg, self.device = model, cfg, device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        step_model = _data_parallel(model, ctx, device)
        self.step_model = torch.compile(step_model) if cfg.compile else step_model
        self.optimizer = build_optimizer(cfg, model)
        self.schedule = LRSchedule(cfg, self.optimizer, steps_per_epoch=steps_per_epoch)
        self.l1_weights = _l1_weights(model)

    def begin_epoch(self) -> list[float]:
        self.model.train()
        return [self.optimizer.param_groups[0]["lr"]]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = x.contiguous(memory_format=self.memory_format)
        with _autocast(cfg, self.device):
            logits = self.step_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        total = loss + cfg.l1 * sum(w.abs().sum() for w in self.l1_weights) if cfg.l1 else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer_step(cfg, self.model, self.optimizer)
        self.schedule.after_step()
        return loss.detach().view(1)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[list, list]:
        with _autocast(self.cfg, self.device):
            logits = predict_logits(self.model, images, batch_size)
        return [float(F.cross_entropy(logits, labels))], [float((logits.argmax(1) == labels).float().mean())]

    def after_epoch(self, row: int, val_accuracy: float) -> None:
        self.schedule.after_epoch(val_accuracy)

    def weights(self, row: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def keep(self, rows: list[int]) -> None:
        pass  # one model: the loop ends when it does


def run_train(model_cfg: ModelConfig, cfg: TrainConfig, prepared_dir: Path, model_path: Path,
              history_path: Path, lineage: Lineage, params: dict | None = None,
              checkpoint_dir: Path | None = None, show_progress: bool | None = None,
              on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train on the prepared train split, validate each epoch, write the checkpoint and history atomically.

    `on_epoch(record, model)` is called after each epoch's validation (the tuner reports to Optuna there,
    the benchmark measures test accuracy); an exception from it ends the run without a final model.
    """
    ctx = context()
    device = device_for(ctx, resolve_device(cfg.device))
    if not ctx.is_main:  # one voice: rank 0 logs the run, the others only warnings
        log.setLevel(logging.WARNING)
    show_progress = sys.stderr.isatty() if show_progress is None else show_progress
    with _determinism(cfg.deterministic), process_group(ctx, device):
        return _train(model_cfg, cfg, Path(prepared_dir), Path(model_path), Path(history_path), lineage,
                      params or {}, Path(checkpoint_dir) if checkpoint_dir else Path(model_path).parent / "checkpoints",
                      show_progress and ctx.is_main, on_epoch, ctx, device)


def _train(model_cfg: ModelConfig, cfg: TrainConfig, prepared_dir: Path, model_path: Path, history_path: Path,
           lineage: Lineage, params: dict, checkpoint_dir: Path, show_progress: bool,
           on_epoch: EpochCallback | None, ctx: DistContext, device: torch.device) -> TrainResult:
    manifest, train_x, train_y, val_x, val_y = load_data(prepared_dir, device)
    args = ModelArgs.from_manifest(model_cfg.arch, model_cfg.dropout, manifest)
    model = build_member(model_cfg, cfg, args).to(device, memory_format=torch.channels_last if cfg.channels_last
                                                   else torch.contiguous_format)
    n_train = len(train_y)
    one = OneModel(model, cfg, ctx, device, steps_per_epoch=len(batch_starts(n_train, cfg.batch_size, ctx.world_size)))
    # The batch order is the same on every rank (each takes its share of it); augmentation and dropout
    # draw per rank, so two ranks never apply the same random transform to their different images.
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    augment_generator = generator if not ctx.enabled else torch.Generator(device=device).manual_seed(cfg.seed + ctx.rank)
    if ctx.rank:
        torch.manual_seed(cfg.seed + ctx.rank)
    trainee = Trainee(cfg, on_epoch=(lambda record: on_epoch(record, model)) if on_epoch is not None else None)

    resume_path = checkpoint_dir / "last.pt"
    key = _resume_key(model_cfg, cfg, manifest)
    start_epoch = 0
    if cfg.resume and resume_path.is_file():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        if state.get("format") == RESUME_FORMAT and state.get("key") == key:
            model.load_state_dict(state["model"])
            one.optimizer.load_state_dict(state["optimizer"])
            one.schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
            generator.set_state(state["rng"]["generator"])
            trainee.history, trainee.best_metric = state["history"], state["best_metric"]
            trainee.bad_epochs, trainee.best_state, start_epoch = state["bad_epochs"], state["best_state"], state["epoch"]
            if ctx.rank:  # rank 0's saved streams, shifted per rank as at the start
                torch.manual_seed(cfg.seed + ctx.rank + 1000 * start_epoch)
                augment_generator.manual_seed(cfg.seed + ctx.rank + 1000 * start_epoch)
            log.info("train: resuming from %s after epoch %d", resume_path, start_epoch)
        else:
            log.info("train: ignoring %s: it belongs to a different config or data", resume_path)

    log.info("train: %s on %s, %d train / %d val images, epochs %d..%d%s", args.arch, device, n_train, len(val_y),
             start_epoch + 1, cfg.epochs,
             f", DistributedDataParallel over {ctx.world_size} processes ({dist_backend()})" if ctx.enabled else "")

    def save_resume(epoch: int) -> None:
        if ctx.is_main:
            _save_resume(resume_path, key, epoch, model, one.optimizer, one.schedule, generator, device, trainee)

    data = EpochData(train_x, train_y, val_x, val_y, args.n_classes, cfg, generator, augment_generator, ctx)
    with _Progress(show_progress, len(data.starts)) as progress:
        train_epochs(one, [trainee], data, "train", first_epoch=start_epoch + 1, progress=progress,
                     after_epoch=save_resume)
    if trainee.status == "diverged":
        raise DivergedError(trainee.reason)

    if cfg.restore_best and trainee.best_state is not None:
        model.load_state_dict(trainee.best_state)
    history = trainee.history
    if ctx.is_main:
        save_checkpoint(model_path, model, config={"model": model_cfg.model_dump(), "train": cfg.model_dump()},
                        params=params, lineage=lineage.to_dict(), classes=manifest["classes"], history=history)
        _write_history(history_path, history)
        resume_path.unlink(missing_ok=True)  # finished: a rerun starts over rather than "resuming" a done run
    barrier(ctx)  # every rank returns once the model is on disk
    return TrainResult(model_path=model_path, history_path=history_path, history=history,
                       best_val_accuracy=max(h["val_accuracy"] for h in history), device=str(device),
                       stopped_early=trainee.stopped_early, resumed_from_epoch=start_epoch)


def _data_parallel(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DDP around the model under torchrun (gradients averaged across ranks in the backward pass)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":  # batch statistics over the global batch, as a single process would see them
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def dist_backend() -> str:
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"


def _save_resume(path: Path, key: str, epoch: int, model, optimizer, schedule, generator, device,
                 trainee: Trainee) -> None:
    state = {
        "format": RESUME_FORMAT, "key": key, "epoch": epoch,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "history": copy.deepcopy(trainee.history), "best_metric": trainee.best_metric,
        "best_state": trainee.best_state, "bad_epochs": trainee.bad_epochs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        torch.save(state, tmp)
