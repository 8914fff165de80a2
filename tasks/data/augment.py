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


# --- audio: raw samples [N, S], on the device, one draw per clip from the run's augmentation generator -----------


def shift_clips(samples: torch.Tensor, max_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each clip in time by up to ± max_fraction of its length, zeros shifted in (train.augment_time_shift)."""
    n, length = samples.shape
    limit = int(max_fraction * length)
    if limit == 0:
        return samples
    shift = torch.randint(-limit, limit + 1, (n, 1), device=samples.device, generator=generator)
    source = torch.arange(length, device=samples.device)[None, :] - shift      # where each output sample comes from
    inside = (source >= 0) & (source < length)
    return torch.where(inside, samples.gather(1, source.clamp(0, length - 1)), torch.zeros((), device=samples.device))


def add_noise(samples: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of standard deviation up to `std` (uniform per clip) added to every sample (train.augment_noise)."""
    level = torch.rand(samples.shape[0], 1, device=samples.device, generator=generator) * std
    noise = torch.randn(samples.shape, device=samples.device, generator=generator, dtype=samples.dtype)
    return samples + level * noise


def mask_spectrum(samples: torch.Tensor, max_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """SpecAugment's two masks on the raw clip (train.augment_spec_mask): one time span of up to max_fraction of
    the clip set to zero, and one frequency band of up to max_fraction of the spectrum removed (zeroed in the
    clip's Fourier transform). The same masks a spectrogram mask would draw, applied before the model's log-mel,
    so the model itself stays free of training-only branches (and the exported graph is the model)."""
    n, length = samples.shape
    device = samples.device

    def spans(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = (torch.rand(n, 1, device=device, generator=generator) * max_fraction * size).long()
        start = (torch.rand(n, 1, device=device, generator=generator) * (size - width + 1)).long()
        return start, start + width

    start, stop = spans(length)
    at = torch.arange(length, device=device)[None, :]
    samples = samples * ~((at >= start) & (at < stop))
    spectrum = torch.fft.rfft(samples, dim=1)
    start, stop = spans(spectrum.shape[1])
    bins = torch.arange(spectrum.shape[1], device=device)[None, :]
    return torch.fft.irfft(spectrum * ~((bins >= start) & (bins < stop)), n=length, dim=1)
