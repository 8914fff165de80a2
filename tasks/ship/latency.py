"""ONNX Runtime on the serving device: accuracy of an ONNX file on real images, latency and throughput, size.

`onnxruntime-gpu` silently falls back to CPU when CUDA cannot load, so the provider a session really got
is read back from the session and recorded beside every number it produced.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
THROUGHPUT_BATCH = 256
WARMUP_RUNS = 20         # untimed runs first: allocations, thread-pool start, CUDA kernel selection
THROUGHPUT_RUNS = 10     # timed batches of THROUGHPUT_BATCH images


class DeviceError(RuntimeError):
    """The requested ONNX Runtime device is not usable here."""


def open_session(path: Path, device: str = "cpu", threads: int = 0):
    """(InferenceSession, provider name) for `device` in auto | cpu | cuda (serve.device) with `threads` intra-op
    threads (serve.threads, 0 = ONNX Runtime's default of one per core); 'cuda' that falls back is an error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    # Probe CUDA only where torch sees a GPU: on a CPU machine the CUDA provider's failed load prints an error.
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available()
                                     and "CUDAExecutionProvider" in ort.get_available_providers())
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != "CUDAExecutionProvider":
        raise DeviceError(f"{path}: serve.device=cuda but ONNX Runtime runs on {provider} (CUDA provider "
                          "did not load): install the CUDA/cuDNN libraries onnxruntime-gpu needs, or use auto/cpu")
    return session, provider


def as_pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 images [N, H, W] -> the model's input: float32 raw pixels [N, 1, H, W]."""
    return images.unsqueeze(1).float().numpy()


def onnx_logits(session, images: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: as_pixels(images[i:i + batch_size])})[0]
                           for i in range(0, len(images), batch_size)])


def onnx_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> float:
    """Top-1 accuracy of the ONNX file on uint8 images [N, H, W] with integer labels [N]."""
    session, _ = open_session(path, device)
    predicted = onnx_logits(session, images).argmax(1)
    return float((predicted == labels.numpy()).mean())


def measure_serving(path: Path, images: torch.Tensor, device: str, latency_runs: int, threads: int = 0) -> dict:
    """p50/p99 latency of single-image requests, throughput at batch 256, and the file size."""
    session, provider = open_session(path, device, threads)
    single = [as_pixels(images[i % len(images)][None]) for i in range(latency_runs)]  # real images, not zeros
    batch = as_pixels(images[:THROUGHPUT_BATCH])
    for x in single[:WARMUP_RUNS]:
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    seconds = []
    for x in single:
        start = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(THROUGHPUT_RUNS):
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    throughput = THROUGHPUT_RUNS * len(batch) / (time.perf_counter() - start)
    ms = np.array(seconds) * 1e3
    return {
        "provider": provider,
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 4),
        "latency_p99_ms": round(float(np.percentile(ms, 99)), 4),
        "latency_runs": latency_runs,
        "throughput_images_per_s": round(throughput, 1),
        "throughput_batch": len(batch),
        "size_bytes": Path(path).stat().st_size,
    }
