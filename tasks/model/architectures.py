"""The networks of the seed article, with input normalisation inside the module.

Every model takes raw pixels (float, 0..255, shape [N, 1, 28, 28]) and returns logits. Keeping the
normalisation in the module means training, the ONNX graph and the server all see the same numbers
and a client never has to know them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild a model from a checkpoint alone."""

    arch: str
    dropout: float
    n_classes: int
    image_shape: tuple[int, int, int]
    mean: float  # of pixels scaled to 0..1, measured on the training split
    std: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, arch: str, dropout: float, manifest: dict) -> "ModelArgs":
        """The model for the prepared data `manifest` describes: its classes, image shape and normalisation."""
        return cls(arch=arch, dropout=dropout, n_classes=len(manifest["classes"]),
                   image_shape=tuple(manifest["image_shape"]), **manifest["normalization"])


class SeedCNN(nn.Module):
    """The article's CNN: conv 1→32 5×5, pool 2, conv 32→64 5×5, pool 2, fc 1024→1024, dropout, fc →10."""

    def __init__(self, n_classes: int, dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 24 -> 12
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 8 -> 4: 64*4*4 = 1024 features
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(dropout), nn.Linear(1024, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SeedMLP(nn.Module):
    """The article's MLP: 784 → 256 → classes."""

    def __init__(self, n_classes: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BNCNN(nn.Module):
    """The seed CNN's shape with batch norm after every layer and a slimmer head (1024→128).

    Batch norm lets it take larger learning rates and batches (fast one-cycle runs); the slimmer head
    cuts the largest weight matrix 8× while keeping the article's conv stack.
    """

    def __init__(self, n_classes: int, dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 24 -> 12
            nn.Conv2d(32, 64, 5, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 8 -> 4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(1024, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {"seed_cnn": SeedCNN, "seed_mlp": SeedMLP, "bn_cnn": BNCNN}


class Classifier(nn.Module):
    """Raw pixels (0..255) -> normalised -> network -> logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Folded into one multiply-add: (x / 255 - mean) / std == x * scale + shift.
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * args.std)))
        self.register_buffer("shift", torch.tensor(-args.mean / args.std))
        self.net = ARCHITECTURES[args.arch](args.n_classes, args.dropout)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels * self.scale + self.shift)


def build_model(args: ModelArgs) -> Classifier:
    if args.arch not in ARCHITECTURES:
        raise ValueError(f"model.arch: unknown architecture {args.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return Classifier(args)
