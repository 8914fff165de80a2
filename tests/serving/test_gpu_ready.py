"""GPU-ready execution, checked where it can be on a CPU machine: serve.provider / serve.precision settings, the
start-up refusal of a provider that did not load (through `tuneline serve` itself), the I/O-binding run path and its
buffer reuse on real ONNX Runtime sessions, and the FP16 choice from a real export report. The CUDA halves are
marked gpu and skip here; bench/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tuneline.serving.errors import LoadError
from tuneline.serving.model_holder import build_model
from tuneline.serving.precision import FP16_FILE, choose_file
from tuneline.serving.repository import RegistryReader
from tuneline.serving.settings import ServeSettings, build_settings, env_overrides
from tuneline.core.config.base import ConfigError
from tuneline.core.config.params import Params, build_params
from tuneline.tasks.ship.export_report import ExportReport
from tuneline.core.io_binding import BoundRunner, make_runner, plain_runner
from tuneline.core.onnx_session import CPU, CUDA, TENSORRT, open_session, resolve_providers
from tuneline.tasks.ship.registry import Registry

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = resolve_providers("auto")[0] != CUDA


# --- settings -------------------------------------------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize("overrides, match", [
    ({"serve.provider": "rocm"}, "serve.provider: Input should be 'auto', 'cuda' or 'tensorrt'"),
    ({"serve.precision": "bf16"}, "serve.precision: Input should be 'auto', 'fp32' or 'fp16'"),
    ({"serve.precision": "fp16", "serve.model_file": "model.int8.onnx"},
     "serve.precision=fp16 and serve.model_file=model.int8.onnx both choose the file"),
])
def test_bad_provider_and_precision_settings_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_params({}, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.fast
def test_provider_and_precision_come_from_the_environment_and_the_cache_dir_from_the_project(tmp_path):
    env = {"TUNELINE_SERVE_PROVIDER": "tensorrt", "TUNELINE_SERVE_PRECISION": "fp16"}
    settings = build_settings(build_params({}, env_overrides(env)), tmp_path, env)
    assert (settings.provider, settings.precision) == ("tensorrt", "fp16")
    assert settings.trt_cache_dir == str((tmp_path / ".tuneline" / "tensorrt").resolve())
    assert (Params().serve.provider, Params().serve.precision) == ("auto", "auto")


# --- the provider refusal -------------------------------------------------------------------------------------
def test_tuneline_serve_refuses_tensorrt_that_did_not_load_in_one_line(tmp_path, capsys):
    if resolve_providers("auto", "tensorrt")[0] == TENSORRT:
        pytest.skip("TensorRT loads here: nothing to refuse")
    from tuneline.flows.cli import main

    code = main(["--project", str(REPO), "serve", "--device", "cuda", "-S", "serve.provider=tensorrt",
                 "--registry", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("tuneline: error: serve.device=cuda with serve.provider=tensorrt but ")
    assert "set serve.provider=cuda or serve.device=auto, or install TensorRT" in err[-1]


def test_a_provider_is_ignored_on_cpu_and_a_fallback_under_auto_is_said(caplog):
    from tuneline.core.onnx_session import _resolved

    _resolved.cache_clear()  # each (device, provider) logs once per process
    with caplog.at_level(logging.WARNING, logger="tuneline.core.onnx_session"):
        assert resolve_providers("cpu", "tensorrt") == [CPU]
        served = resolve_providers("auto", "tensorrt")
    assert "serve.provider=tensorrt ignored: serve.device=cpu" in caplog.text
    if served[0] != TENSORRT:
        assert f"serve.provider=tensorrt did not load (ONNX Runtime runs on {served[0]})" in caplog.text


# --- the I/O-binding run path ---------------------------------------------------------------------------------
def _session(onnx_model: Path, device: str = "cpu"):
    session = open_session(onnx_model, device)
    return session, session.get_inputs()[0].name, session.get_outputs()[0].name


def test_bound_run_gives_the_plain_runs_answers_bit_for_bit_and_reuses_its_buffers(onnx_model, digits):
    session, x, y = _session(onnx_model)
    plain, bound = plain_runner(session, x, y), BoundRunner(session, x, y, capacity=64, pin_memory=True)
    pixels = digits.images[:, None].astype(np.float32)
    for rows in (1, 7, 64, 3, 64):
        assert np.array_equal(bound(pixels[:rows]), plain(pixels[:rows]))
    assert bound.allocations == 1  # one buffer set, reused by every call up to its 64 rows
    pointer = bound._idle[0].inputs.ctypes.data
    bound(pixels[:5])
    assert bound._idle[0].inputs.ctypes.data == pointer and bound.allocations == 1
    assert np.array_equal(bound(pixels[:100]), plain(pixels[:100]))  # more rows than any set holds: a larger one
    assert bound.allocations == 2 and bound.pinned is False  # no CUDA runtime to page-lock with here
    assert np.array_equal(bound(pixels[:1]), digits.logits[:1])


def test_bound_runs_from_several_threads_each_get_their_own_rows(onnx_model, digits):
    session, x, y = _session(onnx_model)
    bound = BoundRunner(session, x, y, capacity=16)
    pixels = digits.images[:, None].astype(np.float32)
    start = threading.Barrier(4)

    def run(offset: int) -> bool:
        start.wait()
        return all(np.array_equal(bound(pixels[offset + i:offset + i + 16]), digits.logits[offset + i:offset + i + 16])
                   for i in range(0, 64, 16))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, (0, 64, 128, 192)))
    assert 1 <= bound.allocations <= 4 and len(bound._idle) <= 4


def test_the_cpu_server_keeps_the_plain_run(tmp_path, onnx_model, digits):
    session, x, y = _session(onnx_model)
    assert not isinstance(make_runner(session, x, y), BoundRunner)
    registry = Registry(tmp_path / "registry")
    version = registry.register({"model.onnx": onnx_model}, name="mnist", metrics={}, gates=[], lineage={}, run_id=None)
    settings = ServeSettings(registry=tmp_path / "registry", device="cpu")
    model = build_model(RegistryReader(settings.registry), version, settings, resolve_providers("cpu"))
    assert model.run_path["io_binding"] is False and model.run_path["file"] == "model.onnx"
    assert np.array_equal(model.run(digits.images[:8, None].astype(np.float32))["logits"], digits.logits[:8])


def test_a_load_warms_the_largest_batch_then_each_power_of_two_before_the_model_answers(tmp_path, onnx_model,
                                                                                        monkeypatch):
    """The first requests after a start or a reload find the sizes the batcher forms warm (issue 25: their p99
    within 2x of the steady one, bench/bench_cold_start.py); largest first, so ONNX Runtime sizes its arena once."""
    from tuneline.serving import model_holder

    seen: list[int] = []
    real_run = model_holder.LoadedModel.run
    monkeypatch.setattr(model_holder.LoadedModel, "run", lambda self, rows: seen.append(len(rows)) or real_run(self, rows))
    registry = Registry(tmp_path / "registry")
    version = registry.register({"model.onnx": onnx_model}, name="mnist", metrics={}, gates=[], lineage={}, run_id=None)
    settings = ServeSettings(registry=tmp_path / "registry", device="cpu", max_batch_size=12)
    build_model(RegistryReader(settings.registry), version, settings, resolve_providers("cpu"))
    assert seen == [12, 8, 4, 2, 1]
    assert model_holder.warm_batch_sizes(12, TENSORRT) == [12, 1]  # one engine profile covers the sizes between


@pytest.mark.gpu
def test_bound_run_on_cuda_is_page_locked_and_matches_the_plain_cuda_run(onnx_model, digits):
    if NO_CUDA:
        pytest.skip("no active CUDA provider here: bench/gpu_check.sh runs this on a GPU machine")
    session, x, y = _session(onnx_model, "cuda")
    runner = make_runner(session, x, y, 64)
    assert isinstance(runner, BoundRunner)
    pixels = digits.images[:64, None].astype(np.float32)
    np.testing.assert_allclose(runner(pixels), plain_runner(session, x, y)(pixels), rtol=1e-5, atol=1e-4)
    assert runner.pinned is True and runner.allocations == 1


# --- FP16 where the GPU gains: the choice from a real export report --------------------------------------------
@pytest.fixture(scope="module")
def fp16_registry(tmp_path_factory, exported_model):
    """The real export (FP32 + FP16 + INT8, export.json) registered as promote registers it: the card carries the
    export report's serving measurements and variants."""
    folder = exported_model.onnx_path.parent
    report = ExportReport.read(folder / "export.json")
    files = {"model.onnx": exported_model.onnx_path, FP16_FILE: folder / "variants" / FP16_FILE}
    root = tmp_path_factory.mktemp("fp16-registry") / "registry"
    version = Registry(root).register(files, name="mnist", metrics={"serving": report.serving,
                                      "variants": report.variants}, gates=[], lineage={}, run_id=None)
    return root, version, report


def _as_measured_on(card: dict, provider: str, fp16_p50: float, fp16_throughput: float) -> dict:
    """The card as a GPU export would have written it: both files measured on `provider`."""
    card = json.loads(json.dumps(card))
    serving, fp16 = card["metrics"]["serving"], card["metrics"]["variants"]["fp16"]
    fp16["serving"] = {**fp16["serving"], "provider": provider, "latency_p50_ms": fp16_p50,
                       "throughput_images_per_s": fp16_throughput}
    serving["provider"] = provider
    return card


def test_auto_precision_serves_fp16_only_where_the_export_measured_it_faster_on_that_gpu(fp16_registry):
    root, version, report = fp16_registry
    card = RegistryReader(root, "mnist").card(version)
    assert report.variants["fp16"]["kept"] and report.serving["provider"] == CPU  # measured on this CPU
    on_cpu = choose_file(card, "auto", "model.onnx", CPU)
    assert on_cpu.file == "model.onnx" and "GPU provider only" in on_cpu.reason
    as_recorded = choose_file(card, "auto", "model.onnx", CUDA)  # a CPU-measured report does not speak for CUDA
    assert as_recorded.file == "model.onnx" and f"measured FP32 on {CPU}" in as_recorded.reason
    fp32 = report.serving
    faster = _as_measured_on(card, CUDA, fp32["latency_p50_ms"] / 2, fp32["throughput_images_per_s"] * 2)
    assert choose_file(faster, "auto", "model.onnx", CUDA).file == FP16_FILE
    slower = _as_measured_on(card, CUDA, fp32["latency_p50_ms"] * 2, fp32["throughput_images_per_s"] * 2)
    assert "FP16 was not faster" in choose_file(slower, "auto", "model.onnx", CUDA).reason
    rejected = json.loads(json.dumps(faster))
    rejected["metrics"]["variants"]["fp16"]["kept"] = False
    assert "rejected" in choose_file(rejected, "auto", "model.onnx", CUDA).reason
    assert choose_file(faster, "auto", "model.int8.onnx", CUDA).file == "model.int8.onnx"  # model_file decides


def test_fp16_served_on_request_keeps_fp32_io_and_a_version_without_it_is_refused(fp16_registry, tmp_path,
                                                                                 onnx_model, digits):
    root, version, _ = fp16_registry
    settings = ServeSettings(registry=root, device="cpu", precision="fp16")
    model = build_model(RegistryReader(root, "mnist"), version, settings, resolve_providers("cpu"))
    assert model.run_path["file"] == FP16_FILE and model.run_path["precision"] == "fp16"
    inputs, outputs = model.session.get_inputs(), model.session.get_outputs()
    assert (inputs[0].type, outputs[0].type) == ("tensor(float)", "tensor(float)")  # what V2 metadata declares
    logits = model.run(digits.images[:64, None].astype(np.float32))["logits"]
    assert logits.dtype == np.float32 and (logits.argmax(1) == digits.classes[:64]).mean() >= 0.95

    plain = Registry(tmp_path / "registry")
    v1 = plain.register({"model.onnx": onnx_model}, name="mnist", metrics={}, gates=[], lineage={}, run_id=None)
    with pytest.raises(LoadError, match=f"{v1}: serve.precision=fp16 but this version has no {FP16_FILE}") as err:
        build_model(RegistryReader(tmp_path / "registry", "mnist"), v1,
                    ServeSettings(registry=tmp_path / "registry", device="cpu", precision="fp16"),
                    resolve_providers("cpu"))
    assert "\n" not in str(err.value)
