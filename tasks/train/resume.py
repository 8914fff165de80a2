"""run_train's resume checkpoint as one typed record, written and read here and nowhere else.

After every epoch run_train (tasks/train/loop.py) saves a `ResumeState` atomically; a rerun of the same run
(same model and train config, same prepared data: `run_identity`) loads it and continues after that epoch, and in
deterministic mode ends with exactly the weights and metrics of an uninterrupted run. A checkpoint of another
run is refused with what differs (`ResumeMismatch`); run_train then starts over.

On disk it is a torch.save'd dict in format `tuneline.resume/1`, the layout the code before this module wrote,
so those checkpoints still resume; the record adds `identity` (the config it belongs to, as JSON) for the
refusal's message, which older checkpoints lack (they are refused by their hash alone).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tuneline.core.atomic import staged_file
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.shards import data_files
from tuneline.tasks.train.averaging import WeightAverage
from tuneline.tasks.train.epochs import MidEpoch, Trainee

RESUME_FORMAT = "tuneline.resume/1"


class ResumeMismatch(ValueError):
    """A file that is not a resume checkpoint of this run (another config or data, or not a resume checkpoint)."""


def run_identity(model_cfg: ModelConfig, train_cfg: TrainConfig, manifest: dict) -> str:
    """What a checkpoint must have been written by to be resumed: the model and train config (train.resume and
    train.checkpoint_every_steps aside: they say whether and how often to checkpoint, not what is trained) and the
    prepared data's file hashes, as canonical JSON."""
    train = train_cfg.model_dump(exclude={"resume", "checkpoint_every_steps"})
    payload = {"model": model_cfg.model_dump(), "train": train, "data": data_files(manifest)}
    return json.dumps(payload, sort_keys=True)


def identity_key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def identity_difference(ours: str, theirs: str, limit: int = 3) -> str:
    """The first `limit` settings that differ, as `train.lr: 0.01 in the checkpoint, 0.001 in this run`."""
    a, b = _flatten(json.loads(ours)), _flatten(json.loads(theirs))
    diffs = [f"{k}: {b.get(k, '(unset)')!r} in the checkpoint, {a.get(k, '(unset)')!r} in this run"
             for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


@dataclass(frozen=True)
class ResumeState:
    """Everything a run needs to continue after `epoch` exactly as if it had not stopped."""

    key: str  # identity_key(run_identity(...)) of the run that wrote it
    epoch: int  # epochs done
    model: dict[str, torch.Tensor]
    optimizer: dict
    schedule: dict  # optim.LRSchedule.state_dict()
    rng: dict  # "torch" (the global CPU RNG: dropout), "generator" (batch order + augmentation), "cuda" or None
    history: list[dict]  # the per-epoch records so far (loop.HISTORY_FIELDS)
    best_metric: float | None  # early stopping's bookkeeping (epochs.Trainee)
    best_state: dict[str, torch.Tensor] | None
    bad_epochs: int
    identity: str | None = None  # run_identity(...) it was written for; None in checkpoints of older releases
    mid_epoch: dict | None = None  # taken inside epoch `epoch` + 1: epochs.MidEpoch's fields (None: at an epoch end)
    average: dict | None = None  # train.ema's weight average (averaging.WeightAverage.state_dict); None: ema off

    @classmethod
    def capture(cls, identity: str, epoch: int, model: torch.nn.Module, optimizer, schedule,
                generator: torch.Generator, device: torch.device, trainee: Trainee,
                mid_epoch: MidEpoch | None = None, average: WeightAverage | None = None) -> ResumeState:
        """The state of a run after `epoch` (its model, optimizer, schedule, RNG streams, trainee's bookkeeping),
        and `mid_epoch` steps into the next one."""
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        return cls(key=identity_key(identity), epoch=epoch, model=model.state_dict(),
                   optimizer=optimizer.state_dict(), schedule=schedule.state_dict(), rng=rng,
                   history=copy.deepcopy(trainee.history), best_metric=trainee.best_metric,
                   best_state=trainee.best_state, bad_epochs=trainee.bad_epochs, identity=identity,
                   mid_epoch=asdict(mid_epoch) if mid_epoch is not None else None,
                   average=average.state_dict() if average is not None else None)

    def save(self, path: Path) -> None:
        """Write it atomically: a run killed mid-write leaves the previous epoch's checkpoint, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as tmp:
            torch.save({"format": RESUME_FORMAT, **asdict(self)}, tmp)

    @classmethod
    def load(cls, path: Path, identity: str, device: torch.device | str = "cpu") -> ResumeState:
        """The checkpoint at `path` if the run `identity` wrote it; else ResumeMismatch saying what differs."""
        path = Path(path)
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ResumeMismatch(f"{path}: not a resume checkpoint (format {found!r}, expected {RESUME_FORMAT!r})")
        if state.get("key") != identity_key(identity):
            written = state.get("identity")
            what = (identity_difference(identity, written) if written
                    else "its config fingerprint differs (written by an older release, which records no more)")
            raise ResumeMismatch(f"{path}: a resume checkpoint of another run ({what})")
        state.pop("format")
        state.setdefault("identity", None)
        state.setdefault("mid_epoch", None)
        state.setdefault("average", None)
        return cls(**state)

    @property
    def resume_point(self) -> MidEpoch | None:
        return MidEpoch(**self.mid_epoch) if self.mid_epoch else None

    def restore(self, model: torch.nn.Module, optimizer, schedule, generator: torch.Generator,
                device: torch.device, trainee: Trainee, average: WeightAverage | None = None) -> None:
        """Put the saved state back into a freshly set-up run (inverse of `capture`)."""
        model.load_state_dict(self.model)
        if average is not None:  # run_identity includes train.ema: a run with the average resumes one with it
            average.load_state_dict(self.average)
        optimizer.load_state_dict(self.optimizer)
        schedule.load_state_dict(self.schedule)
        # RNG states are CPU byte tensors whatever map_location moved them to.
        torch.set_rng_state(self.rng["torch"].cpu())
        if device.type == "cuda" and self.rng.get("cuda") is not None:
            torch.cuda.set_rng_state(self.rng["cuda"].cpu(), device)
        generator.set_state(self.rng["generator"].cpu())
        trainee.history, trainee.best_metric = copy.deepcopy(self.history), self.best_metric
        trainee.bad_epochs, trainee.best_state = self.bad_epochs, self.best_state
