"""`fast_cnn`: a small CIFAR-class network in the spirit of airbench94 (Keller Jordan's CIFAR-10 speedruns).

The layout is airbench's: a stem convolution, then three conv groups (conv 3x3 -> max-pool 2 -> batch norm ->
GELU -> conv 3x3 -> batch norm -> GELU), a global max-pool and a bias-free linear head whose logits are
scaled down (airbench's 1/9: with batch-norm'd features the raw logits start far too confident). Channels
double per group from `width` (stem) to 8 x `width` (last group); airbench94's GPU widths are about
`width=64` (64/256/256). The rest of the recipe lives in the training config: one-cycle lr, label smoothing,
flip augmentation (train.augment_flip), channels_last, bf16 + compile on CUDA (docs/models.md).

CPU cost, measured on the 2-core EPYC this project is developed on (2026-12-02, fp32, channels_last, batch
256, other jobs sharing the cores): width 16 trains at ~600-1000 images/s, width 24 at ~400, width 32 at
~200-290 (the cost grows with width squared). bench/bench_cifar.py measures accuracy per epoch.

Any input size works: a group pools only while the side is at least 2 (a 12x12 image gets 12 -> 6 -> 3 -> 1).

`flip_average=True` (model.kwargs) averages the logits of each image and its mirror image whenever the model is not
training: validation, evaluation, the exported ONNX graph and so the server all score both views (airbench's
test-time augmentation), for twice the inference work. Only for data whose mirror images are the same classes
(train.augment_flip's condition).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    # No bias: batch norm right after it has its own shift.
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)


class ConvGroup(nn.Sequential):
    """conv -> max-pool 2 (when the side allows) -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, pool: bool):
        super().__init__(_conv(c_in, c_out), nn.MaxPool2d(2) if pool else nn.Identity(), nn.BatchNorm2d(c_out),
                         nn.GELU(), _conv(c_out, c_out), nn.BatchNorm2d(c_out), nn.GELU())


class FastCNN(nn.Module):
    """Stem (width) -> groups (2, 4, 8 x width, each pooling 2x) -> global max-pool -> dropout -> linear / scale."""

    def __init__(self, n_classes: int, dropout: float, image_shape: tuple[int, int, int] = (3, 32, 32),
                 width: int = 16, logit_scale: float = 1 / 9, flip_average: bool = False):
        super().__init__()
        if not isinstance(flip_average, bool):
            raise ValueError(f"model.kwargs.flip_average: {flip_average!r} is not true or false")
        self.flip_average = flip_average
        channels, height, width_px = image_shape
        if not 1 <= int(width) <= 1024:
            raise ValueError(f"model.kwargs.width: {width!r} is out of range: fast_cnn takes 1..1024 (16 suits a CPU)")
        width = int(width)
        widths = (2 * width, 4 * width, 8 * width)
        side, groups, c_in = min(height, width_px), [], width
        for c_out in widths:
            groups.append(ConvGroup(c_in, c_out, pool=side >= 2))
            side, c_in = side // 2 if side >= 2 else side, c_out
        self.stem = nn.Sequential(_conv(channels, width), nn.BatchNorm2d(width), nn.GELU())
        self.groups = nn.Sequential(*groups)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], n_classes, bias=False)
        self.logit_scale = float(logit_scale)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(x)).amax(dim=(2, 3))  # global max-pool: [N, C]
        return self.head(self.dropout(x)) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_average and not self.training:
            return (self.logits(x) + self.logits(x.flip(3))) / 2  # the image and its mirror image, left to right
        return self.logits(x)
