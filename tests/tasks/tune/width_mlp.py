"""A model factory (model.arch: tests.tasks.tune.width_mlp:build) whose serving cost is one knob: the hidden width.

An MLP trains in a fraction of a second on a slice of MNIST, so a study over `model.kwargs.hidden` shows accuracy
against size and latency in a few seconds; wider is costlier and (up to a point) more accurate.
"""

import math

from torch import nn


def build(n_classes: int, in_channels: int, image_size: tuple[int, int], dropout: float, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * math.prod(image_size), hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, n_classes))
