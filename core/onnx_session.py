"""ONNX Runtime sessions, built one way for everything that runs a model: the export gates (accuracy,
latency), quantization, promotion and the inference server.

The latency gate only means something if it measures the set-up the server runs, so the providers and the
SessionOptions are decided here and nowhere else; tests/tasks/ship/test_onnx_session.py checks that the gate's
sessions and the server's are built identically.

onnxruntime-gpu lists CUDAExecutionProvider (and TensorrtExecutionProvider) as available even where they cannot
load, and then falls back along the list without an error; so the only trustworthy answer is
`session.get_providers()` after creation, compared with what was asked (check_device). serve.provider refines
serve.device: which GPU provider leads the list (CUDA's own kernels, or TensorRT with CUDA then CPU behind it for
the nodes TensorRT cannot take). Nothing here imports PyTorch: the serving image has none.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from tuneline.core.errors import InputError

Device = Literal["auto", "cpu", "cuda"]  # serve.device
Provider = Literal["auto", "cuda", "tensorrt"]  # serve.provider: which GPU provider leads under auto/cuda
CUDA, CPU, TENSORRT = "CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
# Each provider choice as the list handed to ONNX Runtime, in order of preference. auto is CUDA's own kernels:
# TensorRT only when asked, since it builds an engine per model (tens of seconds to minutes at first load).
CHAINS: dict[str, tuple[str, ...]] = {"auto": (CUDA, CPU), "cuda": (CUDA, CPU), "tensorrt": (TENSORRT, CUDA, CPU)}
_NAMES = {CUDA: "CUDA", TENSORRT: "TensorRT", CPU: "CPU"}
_WHY = {CUDA: "no GPU, driver or CUDA/cuDNN libraries",
        TENSORRT: "no TensorRT libraries (libnvinfer), or CUDA itself did not load"}

log = logging.getLogger(__name__)


class DeviceError(InputError, RuntimeError):
    """serve.device asks for something ONNX Runtime cannot deliver here (cuda without an active CUDA provider):
    a config error (exit 2), for the export gate as for `tuneline serve`."""


ProviderEntry = str | tuple[str, dict[str, str]]  # what InferenceSession(providers=...) takes


@dataclass(frozen=True)
class SessionSetup:
    providers: list[ProviderEntry]  # in order of preference; ONNX Runtime falls back along the list
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


def tensorrt_options(cache_dir: Path | None = None, fp16: bool = False) -> dict[str, str]:
    """TensorRT provider options: FP16 kernels when the served file is the FP16 one; engines (and kernel timings)
    cached in `cache_dir`, so a restart loads them instead of rebuilding. One folder per model version: the
    provider names an engine from the graph's structure, so two versions of one architecture would share a name."""
    options = {"trt_fp16_enable": str(fp16)}
    if cache_dir is not None:
        options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable="True", trt_timing_cache_path=str(cache_dir))
    return options


def session_setup(device: Device, threads: int = 0, providers: Sequence[str] | None = None,
                  provider_options: Mapping[str, Mapping[str, str]] | None = None,
                  provider: Provider = "auto") -> SessionSetup:
    """Providers and options for a session on `device`; `providers` as resolve_providers(device, provider) returned
    them (the server resolves once at start-up), else resolved here; `provider_options` per provider name."""
    chosen = list(providers) if providers is not None else resolve_providers(device, provider)
    extra = provider_options or {}
    entries: list[ProviderEntry] = [(name, dict(extra[name])) if extra.get(name) else name for name in chosen]
    return SessionSetup(providers=entries, options=session_options(threads))


def open_session(model: Path | str | bytes, device: Device = "cpu", threads: int = 0,
                 providers: Sequence[str] | None = None, *, provider: Provider = "auto",
                 provider_options: Mapping[str, Mapping[str, str]] | None = None) -> ort.InferenceSession:
    """A session for an ONNX file or its bytes; DeviceError if `device` is cuda and the provider asked for (the
    first of `providers`, else serve.provider's) is not what it runs on. The provider doing the work is
    `session.get_providers()[0]`."""
    setup = session_setup(device, threads, providers, provider_options, provider)
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=setup.options, providers=setup.providers)
    wanted = setup.providers[0] if isinstance(setup.providers[0], str) else setup.providers[0][0]
    check_device(session.get_providers(), device, where="" if isinstance(model, bytes) else f"{model}: ",
                 wanted=wanted)
    return session


def check_device(active: list[str], device: Device, where: str = "", wanted: str = CUDA) -> str:
    """The provider doing the work; DeviceError if serve.device is cuda and `wanted` (a GPU provider) is not it."""
    if device == "cuda" and (not active or active[0] != wanted):
        name = _NAMES.get(wanted, wanted)
        asked = " with serve.provider=tensorrt" if wanted == TENSORRT else ""
        fix = "set serve.provider=cuda or serve.device=auto, or install TensorRT" if wanted == TENSORRT else \
            "set serve.device=auto or cpu, or fix the CUDA install"
        raise DeviceError(f"{where}serve.device=cuda{asked} but ONNX Runtime runs on {active} ({name} did not load: "
                          f"{_WHY.get(wanted, 'its libraries are missing')}); {fix}")
    return active[0]


def resolve_providers(device: Device, provider: Provider = "auto") -> list[str]:
    """Providers every session on `device` asks for, led by serve.provider's choice, decided once per process by
    a probe.

    Raises DeviceError for cuda when the asked-for provider does not load. Under auto a failed probe falls back
    along the chain (TensorRT, CUDA, CPU) with a warning, and from then on, so that each later session does not
    retry (and re-log) the failing library load.
    """
    return list(_resolved(device, provider))


@functools.cache
def _resolved(device: Device, provider: Provider) -> tuple[str, ...]:
    if device == "cpu":
        if provider != "auto":
            log.warning("serve.provider=%s ignored: serve.device=cpu runs on ONNX Runtime's CPU provider", provider)
        return (CPU,)
    chain = CHAINS[provider]
    available = ort.get_available_providers()
    missing = [name for name in chain if name not in available]
    if missing and device == "cuda":
        asked = f" with serve.provider={provider}" if provider != "auto" else ""
        raise DeviceError(f"serve.device=cuda{asked} but this ONNX Runtime has no {missing[0]} ({available}): "
                          "install onnxruntime-gpu" + (" and TensorRT" if missing[0] == TENSORRT else ""))
    chain = tuple(name for name in chain if name in available)
    if chain[0] == CPU:
        return chain
    if device == "auto":
        ort.set_default_logger_severity(4)  # a failed GPU library load is expected here; callers log the outcome
    active = _probe(list(chain), device)
    if provider != "auto" and active != CHAINS[provider][0]:
        log.warning("serve.provider=%s did not load (ONNX Runtime runs on %s): serve.device=auto falls back to it; "
                    "set serve.device=cuda to refuse to start instead", provider, active)
    return chain[chain.index(active):]


def _probe(providers: list[str], device: Device) -> str:
    """Provider a tiny Identity graph gets: the device check, independent of any model file."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9  # readable by every ONNX Runtime the project admits
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # ONNX Runtime prints its own provider fallback; the caller says it once
        session = open_session(proto.SerializeToString(), device, providers=providers)
    if said.getvalue().strip():
        log.debug("provider probe: %s", " ".join(said.getvalue().split()))
    return session.get_providers()[0]
