"""The one training loop: epochs over the prepared data for one model or K stacked models.

`train_epochs` owns everything a run does per epoch whatever holds the models: the batch order (one
permutation per epoch, each rank's share under DDP), on-device augmentation, the per-model train loss,
divergence checks, validation, history records, early stopping and best weights. The strategy owns the
models: `OneModel` (tasks/train/loop.py, run_train) or the stacked pack (tasks/train/packed.py,
train_packed); its optimizer math is tasks/train/optim.py's. `build_member` is how both build a model.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.augment import add_noise, augment_batch, flip_batch, mask_spectrum, shift_clips
from tuneline.tasks.data.prepare import load_manifest
from tuneline.tasks.data.stream import DataAccess, EpochPlan, SplitReader, epoch_seed
from tuneline.tasks.model.architectures import Classifier, ModelArgs, as_model_input, build_model
from tuneline.tasks.model.external import freeze_backbone, load_initial_weights
from tuneline.tasks.train.distributed import DistContext, all_reduce_sum

log = logging.getLogger(__name__)


def model_args(model_cfg: ModelConfig, manifest: dict) -> ModelArgs:
    """The model args of model.arch (+ model.kwargs) for the prepared data's input spec."""
    return ModelArgs.from_manifest(model_cfg.arch, model_cfg.dropout, manifest, model_cfg.kwargs)


def build_member(model_cfg: ModelConfig, train_cfg: TrainConfig, args: ModelArgs) -> Classifier:
    """The model a run starts from: seeded with train.seed, then built (same seed, same initial weights), then
    model.weights loaded and model.freeze_backbone applied (training-time only: a checkpoint rebuilds without them)."""
    torch.manual_seed(train_cfg.seed)
    model = build_model(replace(args, dropout=model_cfg.dropout))
    if model_cfg.weights:
        load_initial_weights(model, Path(model_cfg.weights))
    if model_cfg.freeze_backbone:
        kept = freeze_backbone(model, args.n_classes)
        log.info("model.freeze_backbone: training only %s", ", ".join(kept))
    return model


def load_data(prepared_dir: Path, device: torch.device, access: DataAccess = DataAccess()
              ) -> tuple[dict, SplitReader, SplitReader]:
    """The manifest and the train and val splits, each resident on `device` or streamed from its shards."""
    manifest = load_manifest(prepared_dir)
    return manifest, SplitReader(prepared_dir, "train", device, access), SplitReader(prepared_dir, "val", device, access)


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
    stream: Stream | None = None  # its own walk through the data (a refilled pack member); None: EpochData's
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
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]: ...  # val
    def after_epoch(self, row: int, val_accuracy: float) -> None: ...  # per-epoch schedules (plateau)
    def weights(self, row: int) -> dict[str, torch.Tensor]: ...  # a copy of a row's state dict
    def keep(self, rows: list[int]) -> None: ...  # drop every other row


AUGMENT_KNOBS = {"image": ("augment_rotate_deg", "augment_translate", "augment_scale", "augment_flip"),
                 "audio": ("augment_time_shift", "augment_noise", "augment_spec_mask"),
                 "text": ()}


def check_augmentation(cfg: TrainConfig, modality: str) -> None:
    """A train.augment_* knob of another modality set away from its default is refused: it would silently do
    nothing. At their defaults (the image knobs' are the fast MNIST recipe's) they are simply not used: a speech or
    text project need not zero the image recipe."""
    foreign = [f"train.{knob}" for other, knobs in AUGMENT_KNOBS.items() if other != modality for knob in knobs
               if getattr(cfg, knob) != TrainConfig.model_fields[knob].default]
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: augmentation for another kind of data; this data is {modality} "
                         f"(its knobs: {', '.join(AUGMENT_KNOBS[modality]) or 'none'}): remove them or set them to their defaults")


@dataclass(frozen=True)
class Stream:
    """One walk through the train split: a batch order (one permutation per epoch) and augmentation draws."""

    order: torch.Generator
    augment: torch.Generator

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> Stream:
        """The walk run_train takes with train.seed `seed`: one generator for the order and the augmentation."""
        generator = torch.Generator(device=device).manual_seed(seed)
        return cls(generator, generator)


@dataclass
class EpochData:
    """The splits (resident or streaming, tasks/data/stream.py) and how each epoch walks them (shared by every
    model of the loop)."""

    train: SplitReader
    val: SplitReader
    n_classes: int
    cfg: TrainConfig  # batch size, augmentation, eval batch size: shared by every model
    generator: torch.Generator  # the batch order (the same on every rank)
    augment_generator: torch.Generator
    ctx: DistContext = DistContext()
    modality: str = "image"  # which train.augment_* knobs apply (core/spec.py)

    @property
    def stream(self) -> Stream:
        return Stream(self.generator, self.augment_generator)

    def plan(self, stream: Stream) -> EpochPlan:
        """This rank's walk through the epoch `stream` draws next (one draw from its order generator)."""
        return self.plan_of(epoch_seed(stream.order))

    def plan_of(self, seed: int) -> EpochPlan:
        """The walk of the epoch drawn as `seed` (a resumed epoch's seed comes from its checkpoint)."""
        return EpochPlan.make(self.train.shard_counts, seed, self.cfg.batch_size, self.ctx.rank, self.ctx.world_size,
                              limit=self.cfg.images_per_epoch)

    @functools.cached_property
    def steps(self) -> int:
        """Steps per epoch (the same every epoch: it depends on the counts, not on the draw); a plan is built once
        for it, not at every call."""
        return self.plan_of(0).steps

    def augment(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        """Stored records -> the model's input, randomly transformed as train.augment_* say (on the device): pixels
        (rotate, shift, zoom, flip), clips (time shift, noise, spectral masks); token ids as they are."""
        cfg = self.cfg
        if self.modality == "text":
            return as_model_input(x)
        if self.modality == "audio":
            x = x.float()
            if cfg.augment_time_shift:
                x = shift_clips(x, cfg.augment_time_shift, stream.augment)
            if cfg.augment_noise:
                x = add_noise(x, cfg.augment_noise, stream.augment)
            if cfg.augment_spec_mask:
                x = mask_spectrum(x, cfg.augment_spec_mask, stream.augment)
            return x
        x = augment_batch(x.float(), cfg.augment_rotate_deg, cfg.augment_translate, cfg.augment_scale, stream.augment)
        if cfg.augment_flip:
            x = flip_batch(x, stream.augment)
        return x

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.val.batches(self.cfg.eval_batch_size)


class _NoProgress:
    def epoch(self, epoch: int, epochs: int) -> None:
        pass

    def advance(self) -> None:
        pass


@dataclass(frozen=True)
class MidEpoch:
    """Where a run stopped inside an epoch: the epoch's plan seed, the steps done and what they summed so far."""

    plan_seed: int
    step: int
    sums: list[float]  # the per-row train-loss sums and, last, the images trained on
    lrs: list[float]   # each row's lr at the epoch's start (the history records it)


def train_epochs(strategy: Strategy, trainees: list[Trainee], data: EpochData, name: str, first_epoch: int = 1,
                 progress=None, after_epoch: Callable[[int], None] | None = None,
                 refill: Callable[[int], list[Trainee]] | None = None,
                 after_steps: tuple[int, Callable[[int, MidEpoch], None]] | None = None,
                 resume: MidEpoch | None = None) -> None:
    """Train every running trainee (row r of `strategy` is the r-th of them) until each completes, stops early,
    is pruned or diverges; each ends with its status set and `on_end` called. `after_epoch(epoch)` runs after
    each epoch's bookkeeping while any trainee is still in it (run_train writes its resume checkpoint there).

    `refill(rows_left)` (packs) runs at each epoch boundary after the leavers are dropped; it returns trainees that
    join from the next step, whose models it has already added to the strategy as its last rows. Each trainee
    counts its own epochs (a newcomer starts at epoch 1) and walks the data by its own `stream` (None: the
    loop's), so a trainee that joins late sees the batches it would see alone; rows on one stream share a batch.

    `after_steps=(n, save)` (one stream only: run_train) calls `save(epoch, MidEpoch)` every n steps inside an
    epoch, and `resume` continues the first epoch from such a record: the same plan from its step on, so a run
    stopped mid-epoch ends as if it had not stopped.
    """
    progress = progress or _NoProgress()  # anything with epoch(epoch, epochs) and advance(): run_train's bar
    live = [i for i, t in enumerate(trainees) if t.status == "running"]  # the trainee of each row
    epoch_of = {i: first_epoch for i in live}  # each trainee's current epoch
    device = data.train.device

    def finish(i: int, row: int, status: str, reason: str = "") -> None:
        t = trainees[i]
        t.status, t.reason, t.stopped_early = status, reason, status == "complete" and t.patience_spent
        if t.keep_state and status != "diverged":
            t.state = t.best_state if t.train.restore_best and t.best_state is not None else strategy.weights(row)
        if t.on_end is not None:
            t.on_end(t)

    def compact(keep_rows: list[int], *row_lists: list) -> None:
        if len(keep_rows) != len(live):
            strategy.keep(keep_rows)
            for values in (live, *row_lists):
                values[:] = [values[r] for r in keep_rows]

    while live:
        started = time.perf_counter()
        epoch, max_epochs = epoch_of[live[0]], max(trainees[i].train.epochs for i in live)
        lrs = strategy.begin_epoch()
        progress.epoch(epoch, max_epochs)
        streams: list[Stream] = []  # the distinct walks of this epoch's rows, and each row's
        row_stream = []
        for i in live:
            stream = trainees[i].stream or data.stream
            if stream not in streams:
                streams.append(stream)
            row_stream.append(streams.index(stream))
        if resume is not None:  # the stopped epoch: its plan, from the step it reached
            if len(streams) != 1:
                raise ValueError("train_epochs: a mid-epoch resume takes one data stream")
            seeds, first_step, lrs = [resume.plan_seed], resume.step, list(resume.lrs)
            loss_sum = torch.tensor(resume.sums, device=device)
            for _ in range(first_step):
                progress.advance()
        else:
            seeds, first_step = [epoch_seed(s.order) for s in streams], 0
            loss_sum = torch.zeros(len(live) + 1, device=device)  # summed on the device: no host sync per step
        resume = None
        plans = [data.plan_of(seed) for seed in seeds]
        by_row = torch.tensor(row_stream, device=device)
        every, save = after_steps if after_steps is not None and len(streams) == 1 else (0, None)
        for k, step in enumerate(zip(*(data.train.walk(plan, first_step) for plan in plans)), start=first_step + 1):
            batches = [(data.augment(x, stream), y) for (x, y), stream in zip(step, streams)]
            if len(batches) == 1:
                x, y = batches[0]
            else:  # one batch per row: [K, B, ...]
                x = torch.stack([b[0] for b in batches]).index_select(0, by_row)
                y = torch.stack([b[1] for b in batches]).index_select(0, by_row)
            loss_sum[:-1] += strategy.step(x, y) * y.shape[-1]
            loss_sum[-1] += y.shape[-1]
            progress.advance()
            if every and k % every == 0 and k < plans[0].steps:  # the epoch's end has its own checkpoint
                save(epoch, MidEpoch(seeds[0], k, loss_sum.tolist(), list(lrs)))
        *sums, n_train = all_reduce_sum(loss_sum, data.ctx).tolist()  # n_train: images trained on, all ranks
        train_losses = [v / max(n_train, 1) for v in sums]

        # Divergence is judged per model; a diverged model leaves before validation, the others go on.
        keep_rows = []
        for row, i in enumerate(list(live)):
            reason = diverged(train_losses[row], trainees[i].train, data.n_classes, epoch_of[i], lrs[row])
            if reason:
                log.info("%s: %s", name, reason)
                finish(i, row, "diverged", f"{reason}{strategy.diverged_note}")
            else:
                keep_rows.append(row)
        compact(keep_rows, train_losses, lrs)

        # Every rank validates the whole split (identical weights -> identical numbers), so early stopping
        # and the plateau schedule decide the same on all ranks without another exchange.
        val_losses, val_accuracies = strategy.evaluate(data.val_batches()) if live else ([], [])
        seconds = time.perf_counter() - started
        keep_rows = []
        for row, i in enumerate(list(live)):
            t = trainees[i]
            strategy.after_epoch(row, val_accuracies[row])
            t.history.append({"epoch": epoch_of[i], "train_loss": round(train_losses[row], 6),
                              "val_loss": round(val_losses[row], 6), "val_accuracy": round(val_accuracies[row], 6),
                              "lr": lrs[row], "seconds": round(seconds, 3), "images_per_s": round(n_train / seconds, 1)})
            stop = bool(t.on_epoch(t.history[-1])) if t.on_epoch is not None else False
            stop = stop and epoch_of[i] < t.train.epochs  # a last epoch is trained: pruning it saves nothing
            if t.improved(val_accuracies[row], val_losses[row]) and t.track_best and t.train.restore_best:
                t.best_state = strategy.weights(row)
            if t.patience_spent:
                log.info("%s: early stop after epoch %d: %s did not improve for %d epoch(s) (best %.4f)", name,
                         epoch_of[i], t.train.early_stopping_metric, t.bad_epochs, t.best_metric)
            if stop:
                finish(i, row, "pruned")
            elif t.patience_spent or epoch_of[i] >= t.train.epochs:
                finish(i, row, "complete")
            else:
                keep_rows.append(row)
        if len(val_accuracies) == 1:
            h = trainees[live[0]].history[-1]
            log.info("%s: epoch %d/%d train_loss %.4f val_loss %.4f val_acc %.4f lr %.3g %.1fs %.0f img/s", name, epoch,
                     max_epochs, h["train_loss"], h["val_loss"], h["val_accuracy"], h["lr"], seconds, n_train / seconds)
        elif val_accuracies:
            log.info("%s: epoch %d/%d, %d model(s), %.1fs, val_acc %s", name, epoch, max_epochs, len(live), seconds,
                     " ".join(f"{a:.4f}" for a in val_accuracies))
        if after_epoch is not None and val_accuracies:
            after_epoch(epoch)
        compact(keep_rows)
        for i in live:
            epoch_of[i] += 1
        for t in refill(len(live)) if refill is not None else []:
            trainees.append(t)
            live.append(len(trainees) - 1)
            epoch_of[live[-1]] = 1
