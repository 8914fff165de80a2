"""Audio in, one contract: decode a clip (WAV, FLAC, OGG), mix it down to mono, resample it, fit it to the model's
length. Fetch uses it on the training data and the server on every request, so a clip is turned into the model's
input the same way in both places. Nothing here imports PyTorch: the serving image has none.

Decoding is libsndfile's (`soundfile`), resampling soxr's (the resampler librosa uses): maintained libraries, not
ours. Samples are float32 in -1..1 (16-bit PCM / 32768, as soundfile reads it).
"""

from __future__ import annotations

import io

import numpy as np

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class AudioError(ValueError):
    """A clip that cannot be decoded or used; the message says what is wrong and what to send instead."""


def decode_audio(data: bytes, where: str = "clip") -> tuple[np.ndarray, int]:
    """(float32 samples [frames, channels], sample rate) of an encoded clip; AudioError naming `where` otherwise."""
    import soundfile

    if not data:
        raise AudioError(f"{where}: empty: send a WAV, FLAC or OGG file")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, TypeError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioError(f"{where}: not a readable WAV, FLAC or OGG file ({reason})") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{where}: the clip has no audio frames")
    if not np.isfinite(samples).all():
        raise AudioError(f"{where}: the clip holds NaN or infinite samples")
    return samples, int(rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames]: the channels' mean (a mono clip is returned as it is)."""
    if samples.ndim == 1:
        return samples
    return samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 samples from `rate` to `target` Hz (soxr, high quality); unchanged when the rates agree."""
    if rate == target:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import soxr

    return soxr.resample(np.ascontiguousarray(samples, dtype=np.float32), rate, target, quality="HQ").astype(np.float32)


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """A clip of exactly `length` samples: a shorter one padded with zeros at the end, a longer one cropped to its
    middle (spoken words sit in the middle of their recordings more often than at either edge)."""
    n = samples.shape[-1]
    if n == length:
        return samples.astype(np.float32, copy=False)
    if n < length:
        out = np.zeros((*samples.shape[:-1], length), dtype=np.float32)
        out[..., :n] = samples
        return out
    start = (n - length) // 2
    return np.ascontiguousarray(samples[..., start:start + length], dtype=np.float32)


def load_clip(data: bytes, sample_rate: int, where: str = "clip") -> np.ndarray:
    """An encoded clip as the model's sample rate, mono, any length: float32 [frames]."""
    samples, rate = decode_audio(data, where)
    return resample(to_mono(samples), rate, sample_rate)
