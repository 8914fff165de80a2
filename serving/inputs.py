"""What each modality's model takes over the wire, and how a checked input becomes the rows its graph takes.

| modality | V2 input | datatype | V2 shape | becomes (the graph's input) |
|---|---|---|---|---|
| image | `pixels` | FP32 or UINT8, raw 0..255 | `[-1, C, H, W]` (or flat `[N, C*H*W]`) | float32 [N, C, H, W] |
| audio | `samples` | FP32, -1..1, mono, at its rate | `[-1, samples]`; any length L ≤ max | float32 [N, samples], fitted |
| text | `text` | BYTES (UTF-8 strings) | `[-1]` (or `[N, 1]`) | int64 token ids [N, max_length] |

Audio rows of another length than the model's are fitted by core.audio.fit_length, the function prepare fitted
the training clips with (zeros at the end of a shorter clip, the middle of a longer one); a clip longer than
serve.max_audio_s (LoadedModel.max_samples) is refused with 413 before anything is decoded or copied. Text rows
are checked by core.text.check_text (UTF-8, not empty, at most MAX_TEXT_BYTES: larger is 413) and tokenized by
the model's own tokenizer (its ONNX metadata, checked against the spec's sha256), the code prepare tokenized the
training split with. `/classify` uploads (a WAV/FLAC/OGG clip, a UTF-8 text) end in the same rows.

Nothing here lets bad input reach ONNX Runtime: every refusal is a BadRequest (400), PayloadTooLarge (413) or
UnsupportedMediaType (415) whose message names the row and what to send.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np

from tuneline.core.audio import AudioError, decode_audio, fit_length, resample, to_mono
from tuneline.core.text import MAX_TEXT_BYTES, TextError, check_text
from tuneline.serving.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

# The V2 input each modality declares: (name, accepted datatypes). An image model's name is its graph's.
V2_INPUTS = {"image": (None, ("FP32", "UINT8")), "audio": ("samples", ("FP32",)), "text": ("text", ("BYTES",))}
# What /classify takes as a raw body (a multipart 'file' is read by the model's modality whatever its type).
UPLOAD_TYPES = {"image": ("image/png", "image/jpeg"),
                "audio": ("audio/wav", "audio/flac", "audio/ogg", "audio/x-wav", "audio/wave", "audio/vnd.wave",
                          "audio/x-flac", "application/ogg"),
                "text": ("text/plain",)}
UPLOAD_WHAT = {"image": "a PNG or JPEG image", "audio": "a WAV, FLAC or OGG clip", "text": "UTF-8 text"}
BOM = "\ufeff"  # a text file's byte-order mark: file format, not text (training texts carry none)


def v2_input_name(model) -> str:
    name, _ = V2_INPUTS[model.spec.modality]
    return name or model.graph_input


def v2_datatypes(model) -> tuple[str, ...]:
    return V2_INPUTS[model.spec.modality][1]


def v2_shape(model) -> list[int]:
    """The input's shape in the V2 metadata: -1 for the batch (and for text, one string per row)."""
    if model.spec.modality == "text":
        return [-1]
    return [-1, *model.spec.shape]


# --- shape --------------------------------------------------------------------------------------------------------


def check_shape(value, name: str, model, max_elements: int) -> list[int]:
    """The request's shape against the model's contract; 413 for an audio clip longer than the server takes."""
    modality = model.spec.modality
    if modality == "text":
        wanted = "[N] (one string per row) or [N, 1] with N ≥ 1"
    elif modality == "audio":
        wanted = (f"[N, L] with N ≥ 1 and 1 ≤ L ≤ {model.max_samples} samples at {model.spec.audio.sample_rate} "
                  f"Hz (the model's clip: {model.spec.audio.samples})")
    else:
        row = list(model.spec.shape)
        wanted = f"[N, {', '.join(map(str, row))}] or [N, {math.prod(row)}] with N ≥ 1"
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise BadRequest(f"input {name!r}: shape must be a list of integers, {wanted}; got {value!r}"[:400])
    if len(value) < 1 or value[0] < 1 or not _shape_fits(value, model):
        raise BadRequest(f"input {name!r}: shape {value} is not accepted: expected {wanted}"[:400])
    count = math.prod(value)
    if count > max_elements:
        raise BadRequest(f"input {name!r}: shape {value} has {count} elements, more than a request may carry "
                         f"({max_elements}): send fewer rows per request")
    if modality == "audio" and value[1] > model.max_samples:
        raise PayloadTooLarge(f"input {name!r}: clips of {value[1]} samples are longer than this server takes: at most "
                              f"{model.max_samples} samples ({model.max_samples / model.spec.audio.sample_rate:g} s at "
                              f"{model.spec.audio.sample_rate} Hz, serve.max_audio_s); the model hears "
                              f"{model.spec.audio.samples} (the middle of a longer clip): send that much")
    return value


def _shape_fits(value: list[int], model) -> bool:
    modality = model.spec.modality
    if modality == "text":
        return value[1:] in ([], [1])
    if modality == "audio":
        return len(value) == 2 and value[1] >= 1
    row = list(model.spec.shape)
    return value[1:] in (row, [math.prod(row)])


# --- BYTES ----------------------------------------------------------------------------------------------------------


def bytes_elements(data: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """The V2 BYTES tensor encoding (binary extension, gRPC raw_input_contents): each element a 4-byte little-endian
    length, then that many bytes; `count` elements exactly filling `data`."""
    view, offset, out = memoryview(data), 0, []
    for index in range(count):
        if offset + 4 > len(view):
            raise BadRequest(f"input {name!r}: BYTES data ends at element {index} of {count} (each element is a "
                             "4-byte little-endian length, then its bytes)")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadRequest(f"input {name!r}: BYTES element {index} declares {length} bytes but only "
                             f"{len(view) - offset} follow")
        out.append(view[offset:offset + length].tobytes())
        offset += length
    if offset != len(view):
        raise BadRequest(f"input {name!r}: {len(view) - offset} bytes left after the {count} BYTES element(s) the "
                         "shape declares")
    return out


def encode_bytes_elements(values) -> bytes:
    """Strings or bytes as the V2 BYTES tensor encoding (what tritonclient's serialize_byte_tensor writes)."""
    parts = []
    for value in values:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)


def json_strings(data, shape: list[int], name: str) -> list[str]:
    """A BYTES input's JSON data: a list of strings (nested one level for shape [N, 1])."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: data must be a JSON array of strings, got {type(data).__name__}")
    flat = [v for row in data for v in row] if all(isinstance(row, list) for row in data) and data else data
    if len(flat) != shape[0]:
        raise BadRequest(f"input {name!r}: shape {shape} has {shape[0]} strings but data has {len(flat)}")
    for index, value in enumerate(flat):
        if not isinstance(value, str):
            raise BadRequest(f"input {name!r} row {index}: expected a string, got {type(value).__name__} "
                             "(BYTES data in JSON is a list of strings)")
    return flat


# --- rows -----------------------------------------------------------------------------------------------------------


def text_rows(values: list, name: str, model) -> np.ndarray:
    """Strings (or UTF-8 bytes) -> int64 token ids [N, max_length] by the model's tokenizer."""
    texts = [checked_text(value, f"input {name!r} row {index}") for index, value in enumerate(values)]
    return model.tokenizer.encode(texts)


def checked_text(value, where: str) -> str:
    """core.text.check_text's answer, its refusals as 400 (oversized: 413)."""
    size = len(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
    if isinstance(value, str):
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text at all
            raise BadRequest(f"{where}: not valid Unicode text (a lone surrogate): send UTF-8 text") from None
    if size is not None and size > MAX_TEXT_BYTES:
        raise PayloadTooLarge(f"{where}: {size} bytes of text; at most {MAX_TEXT_BYTES} bytes of UTF-8 per row: "
                              "send a shorter text (the model reads its first tokens only)")
    try:
        return check_text(value, where)
    except TextError as exc:
        raise BadRequest(str(exc)) from None


def audio_rows(samples: np.ndarray, name: str, model) -> np.ndarray:
    """float32 [N, L] samples (checked finite and in the spec's range) fitted to the model's length."""
    samples = np.asarray(samples, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise BadRequest(f"input {name!r} contains NaN or infinite values")
    low, high = model.spec.value_range
    if samples.size and (samples.min() < low or samples.max() > high):
        raise BadRequest(f"input {name!r}: values span [{samples.min():g}, {samples.max():g}] but the model takes "
                         f"samples in [{low:g}, {high:g}] (float audio; 16-bit PCM divided by 32768)")
    return fit_length(samples, model.spec.audio.samples)


def audio_upload_rows(data: bytes, model) -> np.ndarray:
    """An uploaded WAV/FLAC/OGG clip, any rate and channel count -> float32 [1, samples]: decoded, mixed down,
    resampled and fitted as fetch and prepare did (core/audio.py); 413 past serve.max_audio_s, checked on the
    header before the clip is decoded."""
    rate = model.spec.audio.sample_rate
    seconds = _declared_seconds(data)
    limit_s = model.max_samples / rate
    if seconds is not None and seconds > limit_s:
        raise PayloadTooLarge(f"the clip lasts {seconds:.1f} s; this server takes clips up to {limit_s:g} s "
                              f"(serve.max_audio_s) and the model hears {model.spec.audio.seconds:g} s: send a shorter "
                              "clip")
    try:
        decoded, clip_rate = decode_audio(data, "upload")
    except AudioError as exc:
        raise BadRequest(f"{exc}: send {UPLOAD_WHAT['audio']} (any sample rate, mono or stereo)") from None
    if decoded.shape[0] > limit_s * clip_rate:
        raise PayloadTooLarge(f"the clip lasts {decoded.shape[0] / clip_rate:.1f} s; this server takes clips up to "
                              f"{limit_s:g} s (serve.max_audio_s): send a shorter clip")
    clip = resample(to_mono(decoded), clip_rate, rate)
    return fit_length(clip, model.spec.audio.samples)[None]


def _declared_seconds(data: bytes) -> float | None:
    """The clip's length as its header declares it, without decoding it; None when the header cannot say."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - decode_audio reports the unreadable file, with the decoder's reason
        return None
    if info.samplerate <= 0 or info.frames <= 0:
        return None
    return info.frames / info.samplerate


def text_upload_rows(data: bytes, model) -> np.ndarray:
    """An uploaded text (a .txt file or a text/plain body: UTF-8, a leading byte-order mark dropped) -> token ids."""
    if data.startswith(BOM.encode("utf-8")):
        data = data[len(BOM.encode("utf-8")):]
    return model.tokenizer.encode([checked_text(data, "text")])


def upload_rows(data: bytes, model) -> np.ndarray:
    """A /classify upload for an audio or text model as the rows its graph takes (images: serving/images.py)."""
    if model.spec.modality == "audio":
        return audio_upload_rows(data, model)
    return text_upload_rows(data, model)


def check_upload_type(content_type: str, model) -> None:
    """415 unless a raw /classify body's Content-Type is one the model's modality takes."""
    modality = model.spec.modality
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    accepted = UPLOAD_TYPES[modality]
    if media not in accepted and not (modality == "image" and media.startswith("image/")):  # decode_image names
        # the image formats it refuses, as it always has
        raise UnsupportedMediaType(f"model {model.name!r} classifies {UPLOAD_WHAT[modality]}: send it as "
                                   f"multipart/form-data field 'file' or as a raw body of type "
                                   f"{', '.join(accepted[:3])} (got content-type {content_type or 'none'!r})"[:400])
    if modality == "text":
        charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in parameters.split(";")
                        if p.strip().lower().startswith("charset=")), "utf-8")
        if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
            raise UnsupportedMediaType(f"text/plain; charset={charset}: send UTF-8 text (charset=utf-8)")
