"""One ONNX Runtime set-up: the export's latency gate measures a session built exactly as the server builds
the one it serves (options, thread spinning, providers), seen at the ONNX Runtime boundary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tuneline.serving.model_holder import build_model
from tuneline.serving.repository import RegistryReader
from tuneline.serving.settings import ServeSettings
from tuneline.tasks.ship.latency import measure_serving
from tuneline.core.onnx_session import CUDA, DeviceError, open_session, resolve_providers
from tuneline.tasks.ship.registry import Registry

# Session config entries that change how a session runs; ONNX Runtime has no call that lists the set ones.
CONFIG_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning", "session.force_spinning_stop",
               "session.dynamic_block_base", "session.intra_op_thread_affinities", "session.set_denormal_as_zero",
               "session.disable_prepacking", "session.use_env_allocators", "session.disable_cpu_ep_fallback",
               "session.use_device_allocator_for_initializers", "session.load_model_format",
               "session.use_ort_model_bytes_directly")


@dataclass(frozen=True)
class SessionRecord:
    model: bytes
    requested: dict  # what the caller handed ONNX Runtime: every SessionOptions attribute, config entries, providers
    active: dict     # what ONNX Runtime made of it: providers and their options


def _options(options: ort.SessionOptions | None) -> dict:
    options = options or ort.SessionOptions()
    attributes = {name: str(getattr(options, name)) for name in dir(options)
                  if not name.startswith("_") and not callable(getattr(options, name))}
    config = {}
    for key in CONFIG_KEYS:
        try:
            config[key] = options.get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default applies
            config[key] = None
    return {**attributes, "config": config}


@pytest.fixture
def sessions(monkeypatch) -> list[SessionRecord]:
    """Every InferenceSession created while the test runs, whoever creates it."""
    created: list[SessionRecord] = []

    class Recorded(ort.InferenceSession):
        def __init__(self, path_or_bytes, sess_options=None, providers=None, provider_options=None, **kwargs):
            super().__init__(path_or_bytes, sess_options, providers, provider_options, **kwargs)
            model = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
            created.append(SessionRecord(model, {**_options(sess_options), "providers": list(providers or [])},
                                         {"providers": self.get_providers(),
                                          "provider_options": self.get_provider_options()}))

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    return created


def digit_model(path: Path) -> Path:
    """A tiny classifier with the exported model's interface: raw pixels [batch, 1, 28, 28] in, 10 logits out,
    and the metadata the server reads (input spec, labels)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["pixels", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "digits", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [weights, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {
        "labels": json.dumps([str(d) for d in range(10)]),
        "input": json.dumps({"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 28, 28], "range": [0, 255]})})
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("device", ["cpu", "auto", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_latency_gate_measures_the_session_the_server_serves(tmp_path, sessions, device, threads):
    if device == "cuda" and resolve_providers("auto")[0] != CUDA:
        pytest.skip("no active CUDA provider here")
    model = digit_model(tmp_path / "model.onnx")
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)

    measure_serving(model, images, device, latency_runs=10, threads=threads)  # export's gate.max_latency_p99_ms
    gate = [s for s in sessions if s.model == model.read_bytes()]
    sessions.clear()

    registry = Registry(tmp_path / "registry")
    version = registry.register({"model.onnx": model}, name="digits", metrics={}, gates=[], lineage={}, run_id=None)
    settings = ServeSettings(registry=tmp_path / "registry", device=device, threads=threads)
    served = build_model(RegistryReader(settings.registry), version, settings, resolve_providers(settings.device))
    server = [s for s in sessions if s.model == model.read_bytes()]  # not the start-up device probe

    assert len(gate) == 1 and len(server) == 1
    assert gate[0].requested == server[0].requested
    assert gate[0].active == server[0].active
    # The production settings themselves, not only their equality.
    assert server[0].requested["intra_op_num_threads"] == str(threads)
    assert server[0].requested["config"]["session.intra_op.allow_spinning"] == "0"
    assert served.provider == server[0].active["providers"][0]


def test_cuda_that_falls_back_is_refused_for_the_gate_as_for_the_server(tmp_path):
    if resolve_providers("auto")[0] == CUDA:
        pytest.skip("CUDA is active here; the refusal needs a machine without it")
    with pytest.raises(DeviceError, match="serve.device=cuda but"):
        open_session(digit_model(tmp_path / "model.onnx"), "cuda")
