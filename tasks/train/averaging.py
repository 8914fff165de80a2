"""train.ema: an exponential moving average of a model's weights, the model a run validates, keeps and ships.

Early in a one-cycle run the learning rate is at its peak and the live weights jump from step to step; their
running average sits in the middle of where they jump and scores as well as the live model does epochs later
(MNIST, lean_cnn: 99.2 % test accuracy after two epochs against 98.4 % for the live weights;
docs/benchmarks.md, Training). At the end of the schedule the steps are tiny and the two agree.

Batch-norm statistics are averaged with the weights (as timm's ModelEma and torch.optim.swa_utils with
use_buffers=True do): statistics measured on the live weights would not describe the averaged ones. The decay
warms up as TensorFlow's ExponentialMovingAverage(num_updates) does, min(decay, (1 + n) / (10 + n)) after n
updates, so a short run (a tuning trial, a test on a slice) is not an average of its random initialisation.

One model here (`WeightAverage`, tasks/train/loop.py OneModel); a pack of K stacked models averages its stacked
tensors with per-model decays (`stacked_decays`, tasks/train/packed.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (counted from 1): `decay`, held lower over the first updates."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """The moving average of `model`'s floating-point weights and buffers, as a module of the same architecture."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        live, averaged = model.state_dict(), self.module.state_dict()
        # Integer buffers (batch norm's num_batches_tracked) are counts, not weights: copied, not averaged.
        weights = [k for k in live if live[k].is_floating_point()]
        self._averaged, self._live = [averaged[k] for k in weights], [live[k] for k in weights]
        self._counts = [(averaged[k], live[k]) for k in live if not live[k].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live weights (after each optimizer step)."""
        self.updates += 1
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - warmed_decay(self.decay, self.updates))
        for mine, theirs in self._counts:
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])


def stacked_decays(decays: torch.Tensor, updates: list[int]) -> torch.Tensor:
    """Per-model warmed decays [K] for K stacked models with their own decay and update count each."""
    counts = torch.tensor(updates, dtype=decays.dtype, device=decays.device)
    return torch.minimum(decays, (1 + counts) / (10 + counts))
