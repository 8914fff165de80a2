"""The input spec: what one input row is, derived from the data by prepare and carried to the server.

Prepare measures it on the training split and records it in the manifest; models are built from it, the
checkpoint and the ONNX metadata carry it, and the server reads it (input shape, accepted image sizes and
colours, class names). Nothing downstream of prepare assumes a shape: it asks the spec.

Pixels are uint8 in storage and float32 0..255 at the model's input, laid out NCHW. Mean and std are per
channel, of pixels scaled to 0..1, and applied inside the model (so a client never needs them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SPEC_FORMAT = "tuneline.input_spec/1"


class SpecError(ValueError):
    """A manifest, checkpoint or ONNX file whose input spec is missing or inconsistent."""


@dataclass(frozen=True)
class InputSpec:
    channels: int                 # 1 (gray) or 3 (RGB)
    height: int
    width: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]       # per channel, of pixels / 255, measured on the training split
    std: tuple[float, ...]
    value_range: tuple[float, float] = (0.0, 255.0)
    layout: str = "NCHW"

    def __post_init__(self):
        if self.channels < 1 or self.height < 1 or self.width < 1:
            raise SpecError(f"input spec: shape {self.shape} must be positive")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise SpecError(f"input spec: {self.channels} channel(s) but {len(self.mean)} mean / {len(self.std)} std values")
        if len(self.class_names) < 2:
            raise SpecError(f"input spec: {len(self.class_names)} class(es); a classifier needs at least 2")

    @property
    def shape(self) -> tuple[int, int, int]:
        """One row: (channels, height, width)."""
        return (self.channels, self.height, self.width)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def color(self) -> str:
        return "gray" if self.channels == 1 else "rgb"

    def describe(self) -> str:
        return f"{self.channels}x{self.height}x{self.width} {self.color}, {self.n_classes} classes"

    def to_dict(self) -> dict:
        data = asdict(self)
        return {"format": SPEC_FORMAT, **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        try:
            return cls(channels=int(data["channels"]), height=int(data["height"]), width=int(data["width"]),
                       class_names=tuple(str(c) for c in data["class_names"]),
                       mean=tuple(float(m) for m in data["mean"]), std=tuple(float(s) for s in data["std"]),
                       value_range=tuple(float(v) for v in data.get("value_range", (0.0, 255.0))),
                       layout=str(data.get("layout", "NCHW")))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"input spec: malformed ({exc!r}): re-run `tuneline stage prepare`") from None

    @classmethod
    def from_manifest(cls, manifest: dict) -> "InputSpec":
        """The manifest's spec; a manifest written before specs existed (MNIST-shaped) is read as one."""
        if "input_spec" in manifest:
            return cls.from_dict(manifest["input_spec"])
        try:
            channels, height, width = manifest["image_shape"]
            norm = manifest["normalization"]
            mean, std = norm["mean"], norm["std"]
            mean = tuple(mean) if isinstance(mean, (list, tuple)) else (float(mean),) * channels
            std = tuple(std) if isinstance(std, (list, tuple)) else (float(std),) * channels
            return cls(channels=channels, height=height, width=width,
                       class_names=tuple(str(c) for c in manifest["classes"]), mean=mean, std=std)
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"manifest: no input spec ({exc!r}): re-run `tuneline stage prepare`") from None

    def same_contract(self, other: "InputSpec") -> bool:
        """Whether a model built for `other` takes the same inputs and answers with the same classes.

        Normalisation is inside each model, so two specs that differ only in mean/std are one contract.
        """
        return self.shape == other.shape and self.class_names == other.class_names
