"""Optimizers and learning-rate schedules from TrainConfig, with optional linear warm-up.

Every schedule except plateau is one per-step multiplier of the base lr (a LambdaLR), so warm-up
composes with it by multiplication and resuming only needs the step count. Step and exponential keep
the seed article's per-epoch staircase; cosine and one-cycle move every step. Plateau must react to the
validation metric, so it is torch's ReduceLROnPlateau stepped once per epoch after warm-up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tasks.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


class LRSchedule:
    """Per-step and per-epoch lr control for one optimizer; `state_dict` makes it resumable."""

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        # One-cycle has its own warm-up phase (pct_start); stacking another would double it.
        self.warmup_steps = 0 if cfg.scheduler == "onecycle" else round(cfg.warmup_epochs * steps_per_epoch)
        self.per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self._factor(step))
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
            if cfg.scheduler == "plateau" else None)

    def _factor(self, step: int) -> float:
        """lr multiplier after `step` optimizer steps."""
        cfg, epoch = self.cfg, step // self.steps_per_epoch
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if cfg.scheduler == "step":
            main = cfg.gamma ** (epoch // cfg.step_size)
        elif cfg.scheduler == "exponential":
            main = cfg.gamma ** epoch
        elif cfg.scheduler == "cosine":
            main = 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        elif cfg.scheduler == "onecycle":
            main = self._one_cycle(step)
        else:  # none, plateau (plateau scales the lr itself, per epoch)
            main = 1.0
        return warmup * main

    def _one_cycle(self, step: int) -> float:
        # Cosine up from lr/25 to lr over pct_start of training, then cosine down to lr/1e4 (torch's defaults).
        up = max(1, round(self.cfg.onecycle_pct_start * self.total_steps))
        start, end = 1 / 25, 1 / 1e4
        if step < up:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / up))
        t = min(1.0, (step - up) / max(1, self.total_steps - up))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

    def after_step(self) -> None:
        if self.plateau is None or self.per_step.last_epoch < self.warmup_steps:
            self.per_step.step()

    def after_epoch(self, val_accuracy: float) -> None:
        if self.plateau is not None and self.per_step.last_epoch >= self.warmup_steps:
            self.plateau.step(val_accuracy)

    def state_dict(self) -> dict:
        return {"per_step": self.per_step.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
