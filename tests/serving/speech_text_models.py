"""Tiny speech and text models built through the real pipeline functions on synthetic data, for the server tests.

Speech: WAV files written with the stdlib `wave` module (two classes of sine tones at different pitches, in class
folders, clips of varying length), fetched by tuneline.tasks.data.records.fetch_audio, prepared, trained
(audio_cnn), evaluated and exported as the pipeline does. Text: a tiny TSV of sentences, fetched by fetch_text,
prepared (the tokenizer is trained there), trained (text_bow) and exported. What matters to the server tests is
the files' contract (input name, spec, tokenizer), not the models' accuracy: every test compares the server's
answers with ONNX Runtime run directly on the same file.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPEECH_RATE = 8000       # the model's sample rate (data.sample_rate)
SPEECH_SECONDS = 0.25    # the model's clip length (data.clip_seconds): 2000 samples
TONES = {"high": 1200.0, "low": 300.0}
WORDS = {"positive": ["good", "great", "fine", "lovely", "witty", "superb"],
         "negative": ["bad", "awful", "dull", "boring", "poor", "weak"]}


def wav_bytes(samples: np.ndarray, rate: int, sampwidth: int = 2) -> bytes:
    """float samples [frames] or [frames, channels] in -1..1 as a PCM WAV file (16-bit unless told)."""
    samples = np.asarray(samples, dtype=np.float64)
    frames = samples if samples.ndim == 2 else samples[:, None]
    scale = 2 ** (8 * sampwidth - 1) - 1
    pcm = np.clip(np.round(frames * scale), -scale - 1, scale).astype(f"<i{sampwidth}")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(frames.shape[1])
        out.setsampwidth(sampwidth)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def tone(frequency: float, seconds: float, rate: int, amplitude: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * frequency * t + phase)


def write_tone_folder(root: Path, per_class: int = 30) -> Path:
    """Class folders high/ and low/ of 16-bit mono WAVs at 8 kHz, 0.15-0.35 s each (shorter and longer than the
    model's 0.25 s, so prepare pads some and crops others)."""
    rng = np.random.default_rng(0)
    for name, frequency in TONES.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            seconds = 0.15 + 0.2 * i / (per_class - 1)
            clip = tone(frequency * rng.uniform(0.9, 1.1), seconds, SPEECH_RATE, rng.uniform(0.2, 0.8),
                        rng.uniform(0, 6.28)) + rng.normal(0, 0.01, round(seconds * SPEECH_RATE))
            (folder / f"{name}_{i:02d}.wav").write_bytes(wav_bytes(clip, SPEECH_RATE))
    return root


def write_sentences(path: Path, per_class: int = 40) -> Path:
    """A TSV (sentence, label 0/1) of short sentences built from positive and negative words."""
    rng = np.random.default_rng(0)
    filler = ["the", "movie", "was", "a", "plot", "and", "film", "quite", "really", "story"]
    lines = ["sentence\tlabel"]
    for label, kind in ((1, "positive"), (0, "negative")):
        for _ in range(per_class):
            words = list(rng.choice(filler, 4)) + list(rng.choice(WORDS[kind], 2))
            rng.shuffle(words)
            lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class BuiltModel:
    onnx_path: Path
    prepared_dir: Path


def _train_and_export(base: Path, data: dict, model: dict, name: str) -> BuiltModel:
    from tuneline.core.config.export import ExportConfig
    from tuneline.core.config.gate import GateConfig
    from tuneline.core.config.params import build_params
    from tuneline.tasks.data.fetch import run_fetch
    from tuneline.tasks.data.prepare import run_prepare
    from tuneline.tasks.evaluate.evaluate import run_evaluate
    from tuneline.tasks.lineage import Lineage
    from tuneline.tasks.ship.export import run_export
    from tuneline.tasks.train.loop import run_train

    params = build_params({}, {**{f"data.{k}": v for k, v in data.items()}, **model,
                               "train.device": "cpu", "train.batch_size": 16, "train.eval_batch_size": 64})
    run_fetch(params.data, base / "raw", project_dir=base)
    run_prepare(params.data, base / "raw", base / "prepared")
    out = base / "model"
    out.mkdir()
    run_train(params.model, params.train, base / "prepared", out / "model.pt", out / "history.csv",
              Lineage("test.dir", "p" * 16, "c" * 40), show_progress=False)
    run_evaluate(out / "model.pt", base / "prepared", out / "eval.json", out / "confusion.csv",
                 GateConfig(min_accuracy=0.0), params.train, enforce=False)
    result = run_export(ExportConfig(), out / "model.pt", base / "prepared", out / "eval.json", out / "model.onnx",
                        model_name=name)
    return BuiltModel(result.onnx_path, base / "prepared")


def build_speech_model(base: Path) -> BuiltModel:
    """audio_cnn (width 16, no dropout, Adam 3e-3) on two tone classes at 8 kHz, 0.25 s clips, 15 epochs (it tells
    them apart: width 8 with dropout 0.5 and lr 1e-2 once did not, in CI)."""
    write_tone_folder(base / "tones")
    return _train_and_export(base, {"source": "audio", "audio_folder": "tones", "sample_rate": SPEECH_RATE,
                                    "clip_seconds": SPEECH_SECONDS},
                             {"model.arch": "audio_cnn", "model.kwargs": {"width": 16},
                              "model.dropout": 0.0, "train.epochs": 15, "train.scheduler": "none", "train.lr": 3e-3},
                             "speech")


def build_text_model(base: Path) -> BuiltModel:
    """text_bow on a TSV of positive/negative sentences, 16 tokens, classes negative/positive, 3 epochs."""
    write_sentences(base / "sentences.tsv")
    return _train_and_export(base, {"source": "text", "text_files": "sentences.tsv", "max_length": 16,
                                    "class_names": {"0": "negative", "1": "positive"}},
                             {"model.arch": "text_bow", "train.epochs": 3, "train.lr": 1e-2}, "sentiment")


def model_metadata(onnx_path: Path) -> dict[str, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def offline_logits(onnx_path: Path, rows: np.ndarray) -> np.ndarray:
    """What ONNX Runtime gives for model-ready rows (float32 samples [N, L] or int64 tokens [N, T]) run directly on
    the file: the reference a served answer must equal."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: rows})[0]


def offline_tokens(onnx_path: Path, texts: list[str]) -> np.ndarray:
    """The file's own tokenizer (its metadata) on `texts`: int64 [N, max_length]."""
    from tuneline.core.onnx_metadata import read_input_spec, read_tokenizer_json
    from tuneline.core.text import Tokenizer

    metadata = model_metadata(onnx_path)
    return Tokenizer.from_json(read_tokenizer_json(metadata, read_input_spec(metadata))).encode(texts)


def spec_of(onnx_path: Path):
    from tuneline.core.onnx_metadata import read_input_spec

    return read_input_spec(model_metadata(onnx_path))
