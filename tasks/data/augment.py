"""Data augmentation on whole batches, on the device: one random affine transform per image.

A per-sample torchvision transform would run in Python on the CPU for every image; here a batch of
affine matrices is built at once and applied with one `affine_grid` + `grid_sample`, so augmentation
costs a couple of kernels per step wherever the data lives. Labels are never touched.

Horizontal flips (`flip_batch`, train.augment_flip) are one random bit per image and one `where`: for
natural images (CIFAR-10), not for digits or text, which are not mirror-symmetric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(pixels: torch.Tensor, rotate_deg: float, translate: float, scale: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Randomly rotate (±deg), shift (± fraction of the side) and zoom (1 ± scale) each image of [N, C, H, W]."""
    if not (rotate_deg or translate or scale):
        return pixels
    n, device = pixels.shape[0], pixels.device

    def uniform(half_width: float) -> torch.Tensor:  # U(-w, w) per image
        return (torch.rand(n, device=device, generator=generator) * 2 - 1) * half_width

    angle = uniform(math.radians(rotate_deg))
    zoom = 1 + uniform(scale)
    # affine_grid maps output coords to input coords in [-1, 1] units: a shift of t (fraction of the
    # side) is 2t there, and zooming in by z samples from a region 1/z as large.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, uniform(2 * translate)], 1),
                         torch.stack([sin, cos, uniform(2 * translate)], 1)], 1)
    grid = F.affine_grid(theta.to(pixels.dtype), list(pixels.shape), align_corners=False)
    # Zeros outside the image: MNIST's background is 0, so shifted-in borders look like real background.
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def flip_batch(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of [N, C, H, W] left-right with probability 1/2 (one draw per image from `generator`)."""
    flip = torch.rand(pixels.shape[0], device=pixels.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), pixels.flip(3), pixels)
