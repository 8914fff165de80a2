"""Built-in audio networks: raw samples in, log-mel features computed inside the model, logits out.

The features are part of the graph (exported to ONNX with it), so a client sends raw samples (float32, -1..1, at
the spec's sample rate) and never needs to know how features are made. The short-time Fourier transform is a
strided 1-D convolution with a fixed windowed DFT basis, and the mel filterbank a fixed matrix: both plain
operators every ONNX Runtime provider runs, FP16 and INT8 variants included.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

LOG_FLOOR = 1e-4  # added to mel power before the log: above FP16's subnormals, far below speech energy


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, 0 Hz to Nyquist (Slaney-normalised)."""
    def mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - freqs[None, :]) / np.maximum(upper - centre, 1e-9)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (upper - lower))).astype(np.float32)


class LogMel(nn.Module):
    """[B, samples] -> [B, 1, n_mels, frames]: 25 ms Hann windows every 10 ms, power spectrum, mel, log."""

    def __init__(self, sample_rate: int, n_mels: int = 40, window_s: float = 0.025, hop_s: float = 0.010):
        super().__init__()
        self.hop = max(1, round(hop_s * sample_rate))
        win = max(8, round(window_s * sample_rate))
        n_fft = 1 << math.ceil(math.log2(win))
        window = np.zeros(n_fft, dtype=np.float64)
        offset = (n_fft - win) // 2
        window[offset:offset + win] = np.hanning(win + 2)[1:-1]  # periodic-ish Hann, zero-padded to n_fft
        k = np.arange(n_fft // 2 + 1)[:, None]
        t = np.arange(n_fft)[None, :]
        angle = 2.0 * np.pi * k * t / n_fft
        basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window]).astype(np.float32)
        self.n_fft, self.bins = n_fft, n_fft // 2 + 1
        self.register_buffer("basis", torch.from_numpy(basis)[:, None, :])            # [2 * bins, 1, n_fft]
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(sample_rate, n_fft, n_mels)))  # [mels, bins]

    def frames(self, samples: int) -> int:
        return (samples + self.n_fft - self.n_fft) // self.hop + 1  # padded by n_fft // 2 on both sides

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(samples[:, None, :], (self.n_fft // 2, self.n_fft // 2))
        spec = nn.functional.conv1d(x, self.basis, stride=self.hop)                   # [B, 2 * bins, frames]
        power = spec[:, :self.bins] ** 2 + spec[:, self.bins:] ** 2
        return torch.log(torch.matmul(self.mel, power) + LOG_FLOOR)[:, None]          # [B, 1, mels, frames]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class AudioCNN(nn.Module):
    """Log-mel -> batch norm -> three conv blocks (width, 2x, 4x; pooled 2x2 after the first two) -> global average
    -> dropout -> linear. About 0.1 M parameters at width 24: keyword spotting sized, fast on a CPU."""

    def __init__(self, n_classes: int, dropout: float, input_shape: tuple[int, ...], sample_rate: int = 16000,
                 n_mels: int = 40, width: int = 24, utterance_norm: bool = False):
        super().__init__()
        self.features = LogMel(sample_rate, n_mels)
        self.utterance_norm = utterance_norm  # each clip's log-mel to zero mean, unit variance: loudness-invariant
        self.input_norm = nn.BatchNorm2d(1)
        self.body = nn.Sequential(_block(1, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
                                  _block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, n_classes))

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        x = self.features(samples)
        if self.utterance_norm:
            mean = x.mean(dim=(2, 3), keepdim=True)
            x = (x - mean) / (((x - mean) ** 2).mean(dim=(2, 3), keepdim=True) + 1e-5).sqrt()
        return self.head(self.body(self.input_norm(x)))


AUDIO_ARCHITECTURES = {"audio_cnn": AudioCNN}
