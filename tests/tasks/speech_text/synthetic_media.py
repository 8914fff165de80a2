"""Tiny synthetic speech and text sources, written as users bring them: WAV clips (stdlib `wave`) and TSV files.

Tones: class k is a sine at a pitch of its own (with noise, random phase and length), learnable in a few steps by
a log-mel network. Sentences: class words ("good", "fine" / "bad", "awful") among neutral filler words.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

PITCHES = (300.0, 900.0, 2000.0)


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """16-bit PCM WAV of float samples in -1..1 ([frames] or [frames, channels])."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def tone(pitch: float, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.02, t.size)).astype(np.float32)


def write_tone_folder(root: Path, per_class: int = 12, rates=(8000, 16000), seed: int = 0) -> Path:
    """root/tones/<class>/<n>.wav, clips 0.2-0.6 s at mixed sample rates, one in three stereo."""
    rng = np.random.default_rng(seed)
    for k, pitch in enumerate(PITCHES):
        folder = root / "tones" / f"pitch{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            rate = rates[n % len(rates)]
            clip = tone(pitch, rng.uniform(0.2, 0.6), rate, rng)
            if n % 3 == 0:
                (folder / f"{n}.wav").write_bytes(wav_bytes(np.stack([clip, clip], 1), rate, channels=2))
            else:
                (folder / f"{n}.wav").write_bytes(wav_bytes(clip, rate))
    return root / "tones"


def write_fsdd_like(root: Path, speakers=("ann", "bob"), per_speaker: int = 8, rate: int = 8000, seed: int = 0) -> Path:
    """root/recordings/{label}_{speaker}_{index}.wav, FSDD's naming: index < 2 is the test split here."""
    rng = np.random.default_rng(seed)
    folder = root / "recordings"
    folder.mkdir(parents=True, exist_ok=True)
    for k, pitch in enumerate(PITCHES):
        for speaker in speakers:
            for index in range(per_speaker):
                (folder / f"{k}_{speaker}_{index}.wav").write_bytes(wav_bytes(tone(pitch, 0.3, rate, rng), rate))
    return folder


POSITIVE, NEGATIVE = ("good", "fine", "great"), ("bad", "awful", "dull")
FILLER = ("the", "movie", "was", "a", "plot", "and", "actors", "quite", "story")


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(FILLER, size=rng.integers(3, 9)))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE)))
        rows.append((" ".join(words), label))
    return rows


def write_text_folder(root: Path, n_train: int = 120, n_test: int = 40, test_column: str = "content") -> Path:
    """root/text/train.tsv (label, sentence) and dev.tsv (label, <test_column>): SST-2's layout and its quirk."""
    folder = root / "text"
    folder.mkdir(parents=True, exist_ok=True)
    for name, column, rows in (("train.tsv", "sentence", sentences(n_train, 0)),
                               ("dev.tsv", test_column, sentences(n_test, 1))):
        lines = [f"label\t{column}"] + [f"{label}\t{text}" for text, label in rows]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder
