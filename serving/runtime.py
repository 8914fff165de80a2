"""ONNX Runtime sessions on the device serve.device asks for, and the check that it really got it.

onnxruntime-gpu lists CUDAExecutionProvider as available even where CUDA cannot load, and then falls back
to CPU without an error; so the only trustworthy answer is `session.get_providers()` after creation.
"""

from __future__ import annotations

import onnxruntime as ort

from serving.errors import DeviceError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def check_device(active: list[str], device: str) -> str:
    """The provider doing the work; DeviceError if cuda was asked for and is not active."""
    if device == "cuda" and (not active or active[0] != CUDA):
        raise DeviceError(f"serve.device=cuda but ONNX Runtime runs on {active} (CUDA did not load: no GPU, "
                          "driver or CUDA/cuDNN libraries); set serve.device=auto or cpu, or fix the CUDA install")
    return active[0]


def create_session(model: bytes, providers: list[str], device: str,
                   threads: int = 0) -> tuple[ort.InferenceSession, str]:
    """A session for the serialized model and the provider it really runs on."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    # Spinning worker threads burn the cores the event loop needs between batches (measured on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    return session, check_device(session.get_providers(), device)


def resolve_providers(device: str) -> list[str]:
    """Providers every session of this server will ask for, decided once at start-up by a probe.

    Raises DeviceError for cuda without CUDA. Under auto a failed CUDA probe means CPU from then on, so that
    each later model load does not retry (and re-log) the failing CUDA library load.
    """
    if device == "cpu":
        return [CPU]
    if CUDA not in ort.get_available_providers():
        if device == "cuda":
            raise DeviceError(f"serve.device=cuda but this ONNX Runtime has no CUDA provider "
                              f"({ort.get_available_providers()}): install onnxruntime-gpu")
        return [CPU]
    if device == "auto":
        ort.set_default_logger_severity(4)  # the failed CUDA library load is expected here; we log the outcome
    active = _probe([CUDA, CPU], device)
    return [CUDA, CPU] if active == CUDA else [CPU]


def _probe(providers: list[str], device: str) -> str:
    """Provider a tiny Identity graph gets: the device check, independent of any model file."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9  # readable by every ONNX Runtime the project admits
    return create_session(proto.SerializeToString(), providers, device)[1]
