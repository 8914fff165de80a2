"""The networks of the seed article and the fast CIFAR-class net, with input normalisation inside the module,
and the built-in audio (tasks/model/audio.py) and text (tasks/model/text.py) networks.

Every image model takes raw pixels (float, 0..255, shape [N, C, H, W] from the data's input spec,
core/spec.py) and returns logits. Keeping the
normalisation in the module means training, the ONNX graph and the server all see the same numbers
and a client never has to know them. An audio model takes raw samples (float32 [N, samples], -1..1) and computes
its features inside; a text model takes token ids (int64 [N, max_length]) of the data's tokenizer.

`model.arch` is a built-in name (ARCHITECTURES), `torchvision:NAME` or a user's `module:function`
(tasks/model/external.py; docs/models.md). Built-ins are called as
`cls(n_classes, dropout, image_shape, **model.kwargs)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tuneline.core.spec import InputSpec
from tuneline.tasks.model import external
from tuneline.tasks.model.audio import AUDIO_ARCHITECTURES
from tuneline.tasks.model.fastnet import FastCNN
from tuneline.tasks.model.text import TEXT_ARCHITECTURES


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild a model from a checkpoint alone."""

    arch: str
    dropout: float
    n_classes: int
    image_shape: tuple[int, ...]               # one input row: (channels, height, width), (samples,) or (max_length,)
    mean: float | tuple[float, ...]            # per channel, of pixels scaled to 0..1, measured on the training split
    std: float | tuple[float, ...]
    kwargs: dict = field(default_factory=dict)  # passed to the architecture's builder (model.kwargs)
    modality: str = "image"                    # image | audio | text (core/spec.py)
    # audio: {"sample_rate", "spec"}; text: {"vocab_size", "pad_id", "spec", "tokenizer" (its JSON: the model carries
    # its tokenizer)}. "spec" is the data's input spec (InputSpec.to_dict), which export writes into the ONNX file.
    input: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelArgs":
        """The inverse of to_dict, also for checkpoints written before per-channel stats and kwargs."""
        def channels(value):
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)

        return cls(arch=data["arch"], dropout=float(data["dropout"]), n_classes=int(data["n_classes"]),
                   image_shape=tuple(int(d) for d in data["image_shape"]), mean=channels(data["mean"]),
                   std=channels(data["std"]), kwargs=dict(data.get("kwargs") or {}),
                   modality=str(data.get("modality", "image")), input=dict(data.get("input") or {}))

    @classmethod
    def from_spec(cls, arch: str, dropout: float, spec: InputSpec, kwargs: dict | None = None,
                  tokenizer: str | None = None) -> "ModelArgs":
        """The model for data of input spec `spec`: its classes, input shape and normalisation (images), sample
        rate (audio) or vocabulary and tokenizer JSON (text: `tokenizer`, which the spec names by its sha256)."""
        extra: dict = {}
        if spec.audio is not None:
            extra = {"sample_rate": spec.audio.sample_rate, "spec": spec.to_dict()}
        elif spec.text is not None:
            if tokenizer is None:
                raise ValueError("a text model needs its tokenizer's JSON (the prepared data's tokenizer.json)")
            extra = {"vocab_size": spec.text.vocab_size, "pad_id": spec.text.pad_id, "spec": spec.to_dict(),
                     "tokenizer": tokenizer}
        return cls(arch=arch, dropout=dropout, n_classes=spec.n_classes, image_shape=spec.shape,
                   mean=spec.mean, std=spec.std, kwargs=dict(kwargs or {}), modality=spec.modality, input=extra)

    @classmethod
    def from_manifest(cls, arch: str, dropout: float, manifest: dict, kwargs: dict | None = None) -> "ModelArgs":
        return cls.from_spec(arch, dropout, InputSpec.from_manifest(manifest), kwargs, manifest.get("tokenizer"))

    def example_input(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """`batch` rows of zeros as the model takes them: float32 pixels or samples, int64 token ids."""
        dtype = torch.long if self.modality == "text" else torch.float32
        return torch.zeros(batch, *self.image_shape, dtype=dtype, device=device)

    def per_channel(self, values: float | tuple[float, ...]) -> tuple[float, ...]:
        return tuple(values) if isinstance(values, (tuple, list)) else (float(values),) * self.image_shape[0]


def _conv_padding(height: int, width: int) -> int:
    """The article's valid 5×5 convolutions where the image is big enough; 'same' padding for small ones.

    Two valid conv+pool steps need a side of at least 16 (16 -> 12 -> 6 -> 2 -> 1); MNIST's 28 and
    CIFAR's 32 keep the article's layout (and MNIST its exact weights' shapes).
    """
    return 0 if min(height, width) >= 16 else 2


def _features_after(side: int, padding: int) -> int:
    side = (side + 2 * padding - 4) // 2       # conv 5×5, pool 2
    return (side + 2 * padding - 4) // 2       # again


class SeedCNN(nn.Module):
    """The article's CNN: conv 1→32 5×5, pool 2, conv 32→64 5×5, pool 2, fc 1024→1024, dropout, fc →10."""

    def __init__(self, n_classes: int, dropout: float, image_shape: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        channels, height, width = image_shape
        pad = _conv_padding(height, width)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),   # MNIST: 28 -> 24 -> 12
            nn.Conv2d(32, 64, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),         # 12 -> 8 -> 4: 64*4*4 = 1024
        )
        features = 64 * _features_after(height, pad) * _features_after(width, pad)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(features, 1024), nn.ReLU(), nn.Dropout(dropout), nn.Linear(1024, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SeedMLP(nn.Module):
    """The article's MLP: pixels (784 for MNIST) → 256 → classes."""

    def __init__(self, n_classes: int, dropout: float, image_shape: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(image_shape), 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BNCNN(nn.Module):
    """The seed CNN's shape with batch norm after every layer and a slimmer head (1024→128).

    Batch norm lets it take larger learning rates and batches (fast one-cycle runs); the slimmer head
    cuts the largest weight matrix 8× while keeping the article's conv stack.
    """

    def __init__(self, n_classes: int, dropout: float, image_shape: tuple[int, int, int] = (1, 28, 28),
                 width: int = 32, hidden: int = 128):
        super().__init__()
        channels, height, size = image_shape
        pad = _conv_padding(height, size)
        # width: the first conv's channels (the second has twice as many); 32 is the seed CNN's. The second conv
        # is most of the compute and scales with width², so width 16 costs about a quarter as much per image.
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=pad, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=pad, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        features = 2 * width * _features_after(height, pad) * _features_after(size, pad)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SlimCNN(BNCNN):
    """bn_cnn at half width (16 and 32 channels): a quarter of its convolution work per image, and on MNIST as
    accurate after a few epochs of one-cycle with light augmentation (docs/benchmarks.md, Training speed)."""

    def __init__(self, n_classes: int, dropout: float, image_shape: tuple[int, int, int] = (1, 28, 28),
                 width: int = 16, hidden: int = 128):
        super().__init__(n_classes, dropout, image_shape, width=width, hidden=hidden)


class LeanCNN(BNCNN):
    """slim_cnn with each max-pool moved in front of its batch norm and ReLU: the same convolutions and head, and
    normalisation and activation (forward and backward) on a quarter of the values. On a CPU those element-wise
    passes over the first convolution's full-size output were as costly as the convolutions themselves; the
    pooled order trains about a quarter faster per image with the same accuracy on MNIST (docs/benchmarks.md,
    Training). The fast MNIST default."""

    def __init__(self, n_classes: int, dropout: float, image_shape: tuple[int, int, int] = (1, 28, 28),
                 width: int = 16, hidden: int = 128):
        super().__init__(n_classes, dropout, image_shape, width=width, hidden=hidden)
        channels, height, size = image_shape
        pad = _conv_padding(height, size)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=pad, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 5, padding=pad, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )


ARCHITECTURES: dict[str, type[nn.Module]] = {"seed_cnn": SeedCNN, "seed_mlp": SeedMLP, "bn_cnn": BNCNN,
                                              "slim_cnn": SlimCNN, "lean_cnn": LeanCNN, "fast_cnn": FastCNN}


def arch_kind(arch: str) -> str:
    """'builtin' | 'torchvision' | 'factory'; a one-line ValueError for a name that is none of them."""
    return external.arch_kind(arch)


def user_model_module(arch: str) -> str | None:
    """The user module a `module:function` arch imports (a DVC dep of the stages that build the model), else None."""
    return external.user_model_module(arch)


def build_network(args: ModelArgs) -> nn.Module:
    """The bare network (normalised pixels -> logits) that model.arch names, sized by the input spec."""
    kind = arch_kind(args.arch)
    own = {"image": ARCHITECTURES, "audio": AUDIO_ARCHITECTURES, "text": TEXT_ARCHITECTURES}[args.modality]
    if kind == "builtin" and args.arch not in own:
        raise external.ModelBuildError(f"model.arch: {args.arch} is an image network but the data is {args.modality}: "
                                       f"use one of {', '.join(sorted(own))}")
    if kind != "builtin" and args.modality != "image":
        raise external.ModelBuildError(f"model.arch: {args.arch}: torchvision and module:function networks take "
                                       f"images; for {args.modality} use one of {', '.join(sorted(own))}")
    if args.modality == "audio":
        return _build(own[args.arch], args, sample_rate=args.input["sample_rate"])
    if args.modality == "text":
        return _build(own[args.arch], args, vocab_size=args.input["vocab_size"], pad_id=args.input["pad_id"])
    if kind == "torchvision":
        return external.build_torchvision(args.arch, args.n_classes, args.image_shape, args.kwargs)
    if kind == "factory":
        return external.build_factory(args.arch, args.n_classes, args.dropout, args.image_shape, args.kwargs)
    return _build(ARCHITECTURES[args.arch], args)


def _build(cls: type[nn.Module], args: ModelArgs, **given) -> nn.Module:
    try:
        return cls(args.n_classes, args.dropout, args.image_shape, **given, **args.kwargs)
    except TypeError as exc:
        raise external.ModelBuildError(f"model.kwargs: {args.arch} does not take {sorted(args.kwargs)} ({exc})") from None


def as_model_input(records: torch.Tensor) -> torch.Tensor:
    """Stored records as a model takes them: token ids (int32 in storage) as int64, pixels and samples as float32."""
    return records.long() if records.dtype in (torch.int32, torch.int64) else records.float()


class Classifier(nn.Module):
    """Raw pixels (0..255) -> normalised -> network -> logits; raw samples or token ids -> network -> logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.normalise = args.modality == "image"  # audio normalises its own features; token ids are not scaled
        # Folded into one multiply-add: (x / 255 - mean) / std == x * scale + shift. One channel keeps scalar
        # buffers (the graph and the state dict of single-channel models are what they always were);
        # several channels get one (scale, shift) per channel, broadcast over [C, 1, 1].
        mean, std = args.per_channel(args.mean), args.per_channel(args.std)
        if len(mean) == 1:
            scale, shift = torch.tensor(1.0 / (255.0 * std[0])), torch.tensor(-mean[0] / std[0])
        else:
            scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
            shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.net = build_network(args)
        self.frozen_norms: list[nn.Module] = []  # set by external.freeze_backbone: stay in eval mode

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        for norm in self.frozen_norms:  # a frozen backbone keeps its batch-norm statistics too
            norm.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels * self.scale + self.shift) if self.normalise else self.net(pixels)


def build_model(args: ModelArgs) -> Classifier:
    try:
        arch_kind(args.arch)
    except ValueError as exc:
        raise ValueError(f"model.arch: {exc}") from None
    return Classifier(args)
