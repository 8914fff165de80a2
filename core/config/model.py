"""model: the network the train stage builds (docs/models.md).

`model.arch` is checked here by its form alone, without importing any model code (the server validates
params too, and has no PyTorch): a built-in name, `torchvision:NAME` or `module:function`. Whether a
torchvision model or a factory really exists is for the stage that builds the model to say
(tuneline.tasks.model.external), with the same kind of one-line error.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from tuneline.core.config.base import Section

# The built-in networks' names; tuneline.tasks.model.architectures.ARCHITECTURES builds exactly these (a test holds
# the two together).
# Images, then audio (tasks/model/audio.py), then text (tasks/model/text.py).
BUILTIN_ARCHITECTURES = ("seed_cnn", "seed_mlp", "bn_cnn", "slim_cnn", "lean_cnn", "fast_cnn", "audio_cnn", "text_cnn", "text_bow")
TORCHVISION_PREFIX = "torchvision:"
_TORCHVISION = re.compile(r"torchvision:[A-Za-z_]\w*")
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def check_arch_name(arch: str) -> str:
    """'builtin' | 'torchvision' | 'factory' by the form of `arch`; a one-line ValueError for any other form."""
    if arch in BUILTIN_ARCHITECTURES:
        return "builtin"
    if _TORCHVISION.fullmatch(arch):
        return "torchvision"
    if _FACTORY.fullmatch(arch) and not arch.startswith(TORCHVISION_PREFIX):
        return "factory"
    raise ValueError(f"unknown architecture {arch!r}: use a built-in ({' | '.join(BUILTIN_ARCHITECTURES)}), "
                     "torchvision:NAME (e.g. torchvision:resnet18) or your own factory as module:function "
                     "(e.g. mypkg.nets:build)")


class ModelConfig(Section):
    """The network the train stage builds (docs/models.md)."""

    arch: str = Field("lean_cnn", description="images: seed_cnn | seed_mlp (the article's) | bn_cnn (small CNN with batch norm) | slim_cnn (bn_cnn at half width) | lean_cnn (slim_cnn pooling before batch norm: the fast MNIST default) | fast_cnn (airbench-style CIFAR net) | torchvision:NAME | module:function (your factory); audio: audio_cnn (log-mel CNN); text: text_cnn (Kim's sentence CNN) | text_bow (bag of words)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout rate before the classifier (0 = off)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the architecture's builder, e.g. {width: 16} for fast_cnn; tunable as model.kwargs.KEY")
    weights: str | None = Field(None, description="start from this local state dict (fine-tuning): matching tensors are kept, the rest initialised afresh")
    freeze_backbone: bool = Field(False, description="train only the classifier head (with model.weights: fine-tune the head)")

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        check_arch_name(value)
        return value

