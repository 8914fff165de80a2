"""Captured audio and text rows as the raw records the speech and text sources write (tasks/data/records.py), so
prepare reads them as it reads any clips or sentences (tasks/data/prepare_records.py), held to the served model's
contract:

- audio: each row's samples (the server fitted them to the model's length) as one float32 record; records.json
  names the model's sample rate and clip length (`samples`), which prepare keeps instead of measuring the clips.
- text: each row's string (what the client sent) as its UTF-8 bytes; records.json holds the served model's
  tokenizer (its ONNX metadata, checked against the spec's sha256), which prepare encodes with instead of training
  a new one, so the token ids mean what they meant to the served model.

The classes are the served model's, in its order, whether or not every class got a label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tuneline.core.onnx_metadata import read_tokenizer_json
from tuneline.core.spec import InputSpec, SpecError
from tuneline.core.text import TextError, check_text
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.records import SplitWriter, write_records
from tuneline.tasks.data.shards import RecordLayout

# A clip resampled from an upload can overshoot ±1 a little (the server checks the range of V2 samples only);
# beyond this the row holds no float samples (16-bit PCM, say).
SAMPLE_LIMIT = 1.5


def to_clip(values, spec: InputSpec, where: str) -> np.ndarray:
    """One captured audio row (float samples, fitted by the server to the model's length) as float32 [samples]."""
    try:
        clip = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        clip = None
    if clip is None or clip.ndim != 1:
        raise DataError(f"capture {where}: input is not a list of float samples: not an audio row of this model's "
                        "contract; move its file out of data.capture_dir")
    rate, samples = spec.audio.sample_rate, spec.audio.samples
    if clip.size != samples:
        raise DataError(f"capture {where}: a clip of {clip.size} samples, the model takes {samples} ({rate} Hz x "
                        f"{spec.audio.seconds:g} s): the server captures clips fitted to the model's length, so this "
                        "row is of another contract; move its file out of data.capture_dir")
    if not np.isfinite(clip).all() or np.abs(clip).max() > SAMPLE_LIMIT:
        raise DataError(f"capture {where}: samples {clip.min():.3g}..{clip.max():.3g} are not float audio -1..1 (the "
                        "server captures the samples the model took)")
    return clip


def to_text(value, where: str) -> str:
    """One captured text row: the string the client sent."""
    if not isinstance(value, str):
        raise DataError(f"capture {where}: input is a {type(value).__name__}, not the string sent (a text model's "
                        "rows are captured as their strings; token ids cannot be read back as text): move its file "
                        "out of data.capture_dir")
    try:
        return check_text(value, f"capture {where}")
    except TextError as exc:
        raise DataError(str(exc)) from None


def write_capture_records(staging: Path, spec: InputSpec, metadata: dict[str, str], rows: list[tuple[object, int, str]],
                          shard_mb: float, where: str) -> None:
    """(input, class index, where) rows of an audio or text model as raw records with the model's classes, sample
    rate and clip length or tokenizer (metadata: the captured version's ONNX metadata, named `where`)."""
    if spec.modality == "audio":
        layout, extra = RecordLayout("float32", (None,)), {"sample_rate": spec.audio.sample_rate,
                                                            "samples": spec.audio.samples}
        records = [to_clip(value, spec, at) for value, _, at in rows]
    else:
        try:
            tokenizer = read_tokenizer_json(metadata, spec, where)
        except SpecError as exc:
            raise DataError(f"capture: {exc}") from None
        layout, extra = RecordLayout("uint8", (None,)), {"tokenizer": tokenizer, "tokenizer_kind": spec.text.tokenizer}
        records = [np.frombuffer(to_text(value, at).encode("utf-8"), dtype=np.uint8) for value, _, at in rows]
    writer = SplitWriter("all", staging, layout, shard_mb * 1e6)
    for record, (_, label, _) in zip(records, rows):
        writer.add(record, str(label))
    values = [str(index) for index in range(spec.n_classes)]  # labels are class indices; the names are the spec's
    write_records(staging, spec.modality, {"all": writer}, extra, dict(zip(values, spec.class_names)),
                   label_values=values, source="capture")
