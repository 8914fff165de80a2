"""ONNX Runtime on the serving device: accuracy of an ONNX file on real images, latency and throughput, size.

Sessions come from tuneline.core.onnx_session, the server's own factory, and are run through
tuneline.core.io_binding.make_runner, the server's own run path (I/O binding on a GPU), so the numbers gated here
are those of the set-up the server runs. `onnxruntime-gpu` silently falls back to CPU when CUDA cannot load, so the
provider a session really got is read back from the session and recorded beside every number it produced.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tuneline.core.io_binding import BoundRunner, make_runner
from tuneline.core.onnx_metadata import INPUT_NAME, OUTPUT_NAME
from tuneline.core.onnx_session import Device, Provider, open_session
from tuneline.tasks.data.stream import TensorSplit
from tuneline.tasks.model.architectures import as_model_input

__all__ = ["INPUT_NAME", "OUTPUT_NAME"]  # re-exported: export and quantize import them from here
THROUGHPUT_BATCH = 256
WARMUP_RUNS = 20         # untimed runs first: allocations, thread-pool start, CUDA kernel selection
THROUGHPUT_RUNS = 10     # timed batches of THROUGHPUT_BATCH images


def as_pixels(images: torch.Tensor) -> np.ndarray:
    """Stored records -> the model's input: float32 raw pixels [N, C, H, W] or samples [N, S], int64 token ids."""
    return as_model_input(images).numpy()


def onnx_logits(session, images: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    name = session.get_inputs()[0].name  # pixels, samples or tokens (core/onnx_metadata.py: GRAPH_INPUTS)
    return np.concatenate([session.run([OUTPUT_NAME], {name: as_pixels(images[i:i + batch_size])})[0]
                           for i in range(0, len(images), batch_size)])


def onnx_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor, device: Device = "cpu") -> float:
    """Top-1 accuracy of the ONNX file on uint8 images [N, C, H, W] with integer labels [N]."""
    return split_accuracy(path, TensorSplit(images, labels), device)


def split_accuracy(path: Path, split, device: Device = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy of the ONNX file on a split read batch by batch (a SplitReader on the CPU streams it, so
    memory does not grow with the split)."""
    session = open_session(path, device)
    correct = seen = 0
    for images, labels in split.batches(batch_size):
        predicted = onnx_logits(session, images.cpu(), batch_size).argmax(1)
        correct += int((predicted == labels.cpu().numpy()).sum())
        seen += len(labels)
    return correct / max(seen, 1)


def measure_serving(path: Path, images: torch.Tensor, device: Device, latency_runs: int, threads: int = 0,
                    provider: Provider = "auto") -> dict:
    """p50/p99 latency of single-image requests, throughput at batch 256, and the file size, in a session
    built and run as the server builds and runs it for serve.device=`device`, serve.provider=`provider`,
    serve.threads=`threads`."""
    session = open_session(path, device, threads, provider=provider)
    run = make_runner(session, session.get_inputs()[0].name, OUTPUT_NAME, THROUGHPUT_BATCH)
    single = [as_pixels(images[i % len(images)][None]) for i in range(latency_runs)]  # real images, not zeros
    batch = as_pixels(images[:THROUGHPUT_BATCH])
    for x in single[:WARMUP_RUNS]:
        run(x)
    run(batch)
    seconds = []
    for x in single:
        start = time.perf_counter()
        run(x)
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(THROUGHPUT_RUNS):
        run(batch)
    throughput = THROUGHPUT_RUNS * len(batch) / (time.perf_counter() - start)
    ms = np.array(seconds) * 1e3
    return {
        "provider": session.get_providers()[0],
        "io_binding": isinstance(run, BoundRunner),
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 4),
        "latency_p99_ms": round(float(np.percentile(ms, 99)), 4),
        "latency_runs": latency_runs,
        "throughput_images_per_s": round(throughput, 1),
        "throughput_batch": len(batch),
        "size_bytes": Path(path).stat().st_size,
    }
