"""ONNX Runtime sessions, built one way for everything that runs a model: the export gates (accuracy,
latency), quantization, promotion and the inference server.

The latency gate only means something if it measures the set-up the server runs, so the providers and the
SessionOptions are decided here and nowhere else; tests/tasks/ship/test_onnx_session.py checks that the gate's
sessions and the server's are built identically.

onnxruntime-gpu lists CUDAExecutionProvider as available even where CUDA cannot load, and then falls back
to CPU without an error; so the only trustworthy answer is `session.get_providers()` after creation.
Nothing here imports PyTorch: the serving image has none.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from tasks.errors import InputError

Device = Literal["auto", "cpu", "cuda"]  # serve.device
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class DeviceError(InputError, RuntimeError):
    """serve.device asks for something ONNX Runtime cannot deliver here (cuda without an active CUDA provider):
    a config error (exit 2), for the export gate as for `tuneline serve`."""


@dataclass(frozen=True)
class SessionSetup:
    providers: list[str]          # in order of preference; ONNX Runtime falls back along the list
    options: ort.SessionOptions


def session_options(threads: int = 0) -> ort.SessionOptions:
    """The options of every session: `threads` intra-op threads (serve.threads; 0 = one per core)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    # Spinning worker threads burn the cores the server's event loop needs between batches (measured on 2 cores);
    # the gate measures with the same setting, so its p99 is the server's.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def session_setup(device: Device, threads: int = 0, providers: Sequence[str] | None = None) -> SessionSetup:
    """Providers and options for a session on `device`; `providers` as resolve_providers(device) returned them
    (the server resolves once at start-up), else resolved here."""
    chosen = list(providers) if providers is not None else resolve_providers(device)
    return SessionSetup(providers=chosen, options=session_options(threads))


def open_session(model: Path | str | bytes, device: Device = "cpu", threads: int = 0,
                 providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """A session for an ONNX file or its bytes; DeviceError if `device` is cuda and CUDA is not what it runs on.

    The provider doing the work is `session.get_providers()[0]`.
    """
    setup = session_setup(device, threads, providers)
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=setup.options, providers=setup.providers)
    check_device(session.get_providers(), device, where="" if isinstance(model, bytes) else f"{model}: ")
    return session


def check_device(active: list[str], device: Device, where: str = "") -> str:
    """The provider doing the work; DeviceError if cuda was asked for and is not active."""
    if device == "cuda" and (not active or active[0] != CUDA):
        raise DeviceError(f"{where}serve.device=cuda but ONNX Runtime runs on {active} (CUDA did not load: no GPU, "
                          "driver or CUDA/cuDNN libraries); set serve.device=auto or cpu, or fix the CUDA install")
    return active[0]


def resolve_providers(device: Device) -> list[str]:
    """Providers every session on `device` asks for, decided once per process by a probe.

    Raises DeviceError for cuda without CUDA. Under auto a failed CUDA probe means CPU from then on, so that
    each later session does not retry (and re-log) the failing CUDA library load.
    """
    return list(_resolved(device))


@functools.cache
def _resolved(device: Device) -> tuple[str, ...]:
    if device == "cpu":
        return (CPU,)
    if CUDA not in ort.get_available_providers():
        if device == "cuda":
            raise DeviceError(f"serve.device=cuda but this ONNX Runtime has no CUDA provider "
                              f"({ort.get_available_providers()}): install onnxruntime-gpu")
        return (CPU,)
    if device == "auto":
        ort.set_default_logger_severity(4)  # the failed CUDA library load is expected here; callers log the outcome
    active = _probe([CUDA, CPU], device)
    return (CUDA, CPU) if active == CUDA else (CPU,)


def _probe(providers: list[str], device: Device) -> str:
    """Provider a tiny Identity graph gets: the device check, independent of any model file."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9  # readable by every ONNX Runtime the project admits
    session = open_session(proto.SerializeToString(), device, providers=providers)
    return session.get_providers()[0]
