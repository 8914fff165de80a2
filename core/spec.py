"""The input spec: what one input row is, derived from the data by prepare and carried to the server.

Prepare measures it on the training split and records it in the manifest; models are built from it, the
checkpoint and the ONNX metadata carry it, and the server reads it (input shape, accepted image sizes and
colours, class names). Nothing downstream of prepare assumes a shape: it asks the spec.

Three modalities, one contract:

- image: pixels are uint8 in storage and float32 0..255 at the model's input, laid out NCHW. Mean and std are
  per channel, of pixels scaled to 0..1, and applied inside the model (so a client never needs them).
- audio: mono clips resampled to `audio.sample_rate` and fitted to `audio.samples` (padded with zeros at the end,
  or the middle kept: core/audio.py), float32 -1..1 in storage and at the model's input, laid out [N, samples];
  the features (log-mel) are computed inside the model, so a client sends raw samples.
- text: token ids (int32 in storage, int64 at the model's input), [N, max_length], from the tokenizer prepare
  trained on the training split (core/text.py); its JSON travels with the model, `text.sha256` names it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SPEC_FORMAT = "tuneline.input_spec/1"
MODALITIES = ("image", "audio", "text")


class SpecError(ValueError):
    """A manifest, checkpoint or ONNX file whose input spec is missing or inconsistent."""


@dataclass(frozen=True)
class AudioInput:
    """What one audio row is: `samples` mono samples at `sample_rate` (the clip length the model was trained on)."""

    sample_rate: int
    samples: int
    fit: str = "pad-end-crop-center"  # shorter clips get zeros at the end; longer ones keep their middle

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


@dataclass(frozen=True)
class TextInput:
    """What one text row is: `max_length` token ids from the tokenizer whose JSON has sha256 `sha256`."""

    tokenizer: str          # the tokenizer's kind, e.g. "wordlevel" (Hugging Face tokenizers' model type)
    vocab_size: int
    max_length: int
    pad_id: int
    sha256: str             # of the tokenizer's JSON: its identity
    padding: str = "end"     # pad ids after the tokens
    truncation: str = "end"  # tokens past max_length are dropped from the end
    lowercase: bool = True


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
    modality: str = "image"
    audio: AudioInput | None = None
    text: TextInput | None = None

    @classmethod
    def for_audio(cls, class_names, sample_rate: int, samples: int) -> "InputSpec":
        return cls(channels=1, height=1, width=samples, class_names=tuple(class_names), mean=(0.0,), std=(1.0,),
                   value_range=(-1.0, 1.0), layout="NS", modality="audio", audio=AudioInput(sample_rate, samples))

    @classmethod
    def for_text(cls, class_names, text: TextInput) -> "InputSpec":
        return cls(channels=1, height=1, width=text.max_length, class_names=tuple(class_names), mean=(0.0,),
                   std=(1.0,), value_range=(0.0, float(text.vocab_size - 1)), layout="NT", modality="text", text=text)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise SpecError(f"input spec: modality {self.modality!r}; expected one of {', '.join(MODALITIES)}")
        if (self.modality == "audio") != (self.audio is not None) or (self.modality == "text") != (self.text is not None):
            raise SpecError(f"input spec: a {self.modality} spec needs its own section (audio / text) and no other")
        if self.audio is not None and (self.audio.sample_rate < 1 or self.audio.samples < 1):
            raise SpecError(f"input spec: audio {self.audio}: sample rate and samples must be positive")
        if self.text is not None and (self.text.vocab_size < 2 or self.text.max_length < 1):
            raise SpecError(f"input spec: text {self.text}: vocabulary of at least 2, max_length at least 1")
        if self.channels < 1 or self.height < 1 or self.width < 1:
            raise SpecError(f"input spec: shape {self.shape} must be positive")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise SpecError(f"input spec: {self.channels} channel(s) but {len(self.mean)} mean / {len(self.std)} std values")
        if len(self.class_names) < 2:
            raise SpecError(f"input spec: {len(self.class_names)} class(es); a classifier needs at least 2")

    @property
    def shape(self) -> tuple[int, ...]:
        """One row: (channels, height, width) of an image, (samples,) of a clip, (max_length,) of a text."""
        if self.audio is not None:
            return (self.audio.samples,)
        if self.text is not None:
            return (self.text.max_length,)
        return (self.channels, self.height, self.width)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def color(self) -> str:
        return "gray" if self.channels == 1 else "rgb"

    def describe(self) -> str:
        if self.audio is not None:
            return (f"audio {self.audio.sample_rate} Hz x {self.audio.seconds:.2f} s ({self.audio.samples} samples) "
                    f"mono, {self.n_classes} classes")
        if self.text is not None:
            return (f"text <= {self.text.max_length} tokens ({self.text.tokenizer}, {self.text.vocab_size} ids), "
                    f"{self.n_classes} classes")
        return f"{self.channels}x{self.height}x{self.width} {self.color}, {self.n_classes} classes"

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("audio", "text"):  # absent for images: an image spec's dict is what it always was
            if data[key] is None:
                del data[key]
        if self.modality == "image":
            del data["modality"]
        return {"format": SPEC_FORMAT, **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        try:
            return cls(channels=int(data["channels"]), height=int(data["height"]), width=int(data["width"]),
                       class_names=tuple(str(c) for c in data["class_names"]),
                       mean=tuple(float(m) for m in data["mean"]), std=tuple(float(s) for s in data["std"]),
                       value_range=tuple(float(v) for v in data.get("value_range", (0.0, 255.0))),
                       layout=str(data.get("layout", "NCHW")), modality=str(data.get("modality", "image")),
                       audio=AudioInput(**data["audio"]) if data.get("audio") else None,
                       text=TextInput(**data["text"]) if data.get("text") else None)
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
        return (self.modality == other.modality and self.shape == other.shape and self.class_names == other.class_names
                and self.audio == other.audio and self.text == other.text)
