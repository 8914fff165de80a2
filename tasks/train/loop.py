"""Stage `train`: prepared tensors + config -> checkpoint + per-epoch history.

Speed comes from data layout, not cleverness: the splits live on the device as uint8 tensors and each
batch is a slice of a random permutation (no per-sample DataLoader: the seed article's recipe spends
most of an epoch in Python). Augmentation runs on whole batches on the device; bf16 autocast and
channels_last on CUDA. Losses are summed on the device and read once per epoch, so the step loop
never waits for the host.

Every epoch ends with an atomic resume checkpoint (tasks/train/resume.py: model, optimizer, schedule, RNG
states, best metric, history); a rerun of the same config after a crash continues from it, and in
deterministic mode ends with exactly the metrics of an uninterrupted run. The run's set-up (device, data,
model, data streams) is tasks/train/setup.py's, shared with tuning trials and packs.

Under `torchrun` the same loop trains with DistributedDataParallel (tasks/train/distributed.py): each rank
takes its share of every global batch, rank 0 writes; a checkpoint resumes at any world size.

One loop, two strategies: tasks/train/epochs.py runs the epochs (data order, augmentation, divergence
checks, validation, history records, early stopping, best weights) for a strategy that holds one model
(`OneModel`, here: run_train) or K stacked models (tasks/train/packed.py: packed tuning trials). A
strategy only trains a batch, validates and hands out weights; the optimizer math of both is in
tasks/train/optim.py.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tuneline.core.atomic import staged_file
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.stream import DataAccess
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.model.architectures import Classifier, as_model_input
from tuneline.tasks.model.checkpoint import save_checkpoint
from tuneline.tasks.train.distributed import DistContext, barrier, context
from tuneline.tasks.train.epochs import MidEpoch, Trainee, train_epochs
from tuneline.tasks.train.averaging import WeightAverage
from tuneline.tasks.train.optim import LRSchedule, build_optimizer, optimizer_step
from tuneline.tasks.train.resume import ResumeMismatch, ResumeState, run_identity
from tuneline.tasks.train.setup import RunSetup, autocast, memory_format, prepare_run, resolve_device

__all__ = ["DivergedError", "HISTORY_FIELDS", "OneModel", "TrainResult", "predict_logits", "predict_split", "read_history",
           "resolve_device", "run_train"]  # resolve_device: setup.py's, re-exported for evaluate and the benchmarks

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "images_per_s")
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


@torch.no_grad()
def predict_logits(model: Classifier, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fp32 logits for uint8 images [N, C, H, W] (on the model's device), in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(as_model_input(images[i:i + batch_size])).float()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def predict_split(model: Classifier, split, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, labels) for every record of a split reader (tasks/data/stream.py), batch by batch: a streamed
    split is never whole in memory, only its logits are (classes per record)."""
    model.eval()
    logits, labels = [], []
    for images, y in split.batches(batch_size):
        logits.append(model(as_model_input(images)).float())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def _write_history(path: Path, history: list[dict]) -> None:
    with staged_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def read_history(path: Path) -> list[dict]:
    """The per-epoch records _write_history wrote, with their numbers as numbers again."""
    with open(path, newline="") as handle:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


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



# --- One model: run_train ------------------------------------------------------------------------------------

def _l1_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    # Weights of conv and linear layers only: penalising biases and norm scales does not sparsify anything.
    return [p for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1]


def data_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of [B, classes] logits; for [members, B, classes] (an ensemble in training mode, e.g.
    tasks/model/text.py TextCNNEnsemble) the mean of the members' own cross-entropies, so each learns alone."""
    if logits.dim() == 3:
        logits, y = logits.reshape(-1, logits.shape[-1]), y.repeat(logits.shape[0])
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


class OneModel:
    """The one-model strategy: a module (DDP-wrapped under torchrun, optionally compiled) and a torch optimizer."""

    size = 1
    diverged_note = "; no model was saved"

    def __init__(self, model: Classifier, cfg: TrainConfig, ctx: DistContext, device: torch.device, steps_per_epoch: int):
        self.model, self.cfg, self.device = model, cfg, device
        self.memory_format = memory_format(cfg)
        step_model = _data_parallel(model, ctx, device)
        self.step_model = torch.compile(step_model) if cfg.compile else step_model
        self.optimizer = build_optimizer(cfg, model)
        self.schedule = LRSchedule(cfg, self.optimizer, steps_per_epoch=steps_per_epoch)
        self.l1_weights = _l1_weights(model)
        self.average = WeightAverage(model, cfg.ema) if cfg.ema else None
        # The model validation scores and the run keeps: the weight average under train.ema, else the live one.
        self.eval_model = self.average.module if self.average is not None else model

    def begin_epoch(self) -> list[float]:
        self.model.train()
        return [self.optimizer.param_groups[0]["lr"]]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.dim() == 4:  # channels_last is a layout of image batches; clips and token ids have none
            x = x.contiguous(memory_format=self.memory_format)
        with autocast(cfg, self.device):
            logits = self.step_model(x)
        loss = data_loss(logits, y, cfg.label_smoothing)
        total = loss + cfg.l1 * sum(w.abs().sum() for w in self.l1_weights) if cfg.l1 else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer_step(cfg, self.model, self.optimizer)
        self.schedule.after_step()
        if self.average is not None:
            self.average.update()
        return loss.detach().view(1)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]:
        model = self.eval_model
        model.eval()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        with autocast(self.cfg, self.device):
            for images, labels in batches:
                logits = model(as_model_input(images)).float()
                loss += F.cross_entropy(logits, labels, reduction="sum")
                correct += (logits.argmax(1) == labels).sum()
                seen += len(labels)
        return [float(loss) / max(seen, 1)], [float(correct) / max(seen, 1)]

    def after_epoch(self, row: int, val_accuracy: float) -> None:
        self.schedule.after_epoch(val_accuracy)

    def weights(self, row: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.eval_model.state_dict().items()}

    def keep(self, rows: list[int]) -> None:
        pass  # one model: the loop ends when it does


def run_train(model_cfg: ModelConfig, cfg: TrainConfig, prepared_dir: Path, model_path: Path,
              history_path: Path, lineage: Lineage, params: dict | None = None,
              checkpoint_dir: Path | None = None, show_progress: bool | None = None,
              on_epoch: EpochCallback | None = None, access: DataAccess = DataAccess()) -> TrainResult:
    """Train on the prepared train split, validate each epoch, write the checkpoint and history atomically.

    `access` (data.resident_max_mb, data.loader_workers) says whether the splits are held on the device or
    streamed from their shards; either way the batches are the same (tasks/data/stream.py).

    `on_epoch(record, model)` is called after each epoch's validation (the tuner reports to Optuna there,
    the benchmark measures test accuracy); an exception from it ends the run without a final model.
    """
    ctx = context()
    if not ctx.is_main:  # one voice: rank 0 logs the run, the others only warnings
        logging.getLogger("tuneline.tasks.train").setLevel(logging.WARNING)  # this module and the epoch loop
    show_progress = sys.stderr.isatty() if show_progress is None else show_progress
    with prepare_run(model_cfg, cfg, prepared_dir, ctx=ctx, access=access) as run:
        return _train(run, model_cfg, cfg, Path(model_path), Path(history_path), lineage, params or {},
                      Path(checkpoint_dir) if checkpoint_dir else Path(model_path).parent / "checkpoints",
                      show_progress and ctx.is_main, on_epoch)


def _train(run: RunSetup, model_cfg: ModelConfig, cfg: TrainConfig, model_path: Path, history_path: Path,
           lineage: Lineage, params: dict, checkpoint_dir: Path, show_progress: bool,
           on_epoch: EpochCallback | None) -> TrainResult:
    model, ctx, device, data = run.model, run.ctx, run.device, run.data
    one = OneModel(model, cfg, ctx, device, steps_per_epoch=run.steps_per_epoch)
    trainee = Trainee(cfg, on_epoch=(lambda record: on_epoch(record, one.eval_model)) if on_epoch is not None else None)

    resume_path = checkpoint_dir / "last.pt"
    identity = run_identity(model_cfg, cfg, run.manifest)
    start_epoch, mid_epoch = 0, None
    if cfg.resume and resume_path.is_file():
        try:
            state = ResumeState.load(resume_path, identity, device)
        except ResumeMismatch as exc:
            log.info("train: not resuming, starting over: %s", exc)
        else:
            state.restore(model, one.optimizer, one.schedule, data.generator, device, trainee, one.average)
            start_epoch, mid_epoch = state.epoch, state.resume_point
            run.seed_rank(epochs_done=start_epoch)  # rank 0's streams are the checkpoint's; the others move on
            log.info("train: resuming from %s after epoch %d%s", resume_path, start_epoch,
                     f" and {mid_epoch.step} step(s) of epoch {start_epoch + 1}" if mid_epoch else "")

    log.info("train: %s on %s, %d train / %d val images, epochs %d..%d%s", run.args.arch, device, len(data.train),
             len(data.val), start_epoch + 1, cfg.epochs,
             f", DistributedDataParallel over {ctx.world_size} processes ({dist_backend()})" if ctx.enabled else "")

    def save_resume(epoch: int, mid: MidEpoch | None = None) -> None:
        if ctx.is_main:  # after `epoch` (or `mid.step` steps into it): epochs done, then the steps
            ResumeState.capture(identity, epoch if mid is None else epoch - 1, model, one.optimizer, one.schedule,
                                data.generator, device, trainee, mid_epoch=mid, average=one.average).save(resume_path)

    every = cfg.checkpoint_every_steps
    with _Progress(show_progress, data.steps) as progress:
        train_epochs(one, [trainee], data, "train", first_epoch=start_epoch + 1, progress=progress,
                     after_epoch=save_resume, after_steps=(every, save_resume) if every else None, resume=mid_epoch)
    if trainee.status == "diverged":
        raise DivergedError(trainee.reason)

    if cfg.restore_best and trainee.best_state is not None:
        model.load_state_dict(trainee.best_state)
    elif one.average is not None:  # the last epoch's weights: their average, as validated
        model.load_state_dict(one.eval_model.state_dict())
    history = trainee.history
    if ctx.is_main:
        save_checkpoint(model_path, model, config={"model": model_cfg.model_dump(), "train": cfg.model_dump()},
                        params=params, lineage=lineage.to_dict(), classes=run.manifest["classes"], history=history)
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
