import json

import numpy as np
import onnx
import pytest
import torch

from tests.prepared_edit import keep_records
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.core.config.export import ExportConfig
from tuneline.core.config.gate import GateConfig
from tuneline.tasks.ship.export import VARIANTS_INDEX, ParityError, check_parity, run_export
from tuneline.core.onnx_session import open_session
from tuneline.tasks.evaluate.gate import GateFailed
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.ship.quantize import build_variant
from tuneline.tasks.data.idx import DataError
from tuneline.core.spec import InputSpec
from tuneline.core.onnx_metadata import read_input_spec


@pytest.fixture(scope="module")
def exported(exported_model):
    return exported_model  # tests/conftest.py: evaluate + export with variants, as the pipeline runs them


def test_export_is_one_checked_file_with_parity(exported):
    path = exported.onnx_path
    assert [p.name for p in path.parent.iterdir() if p.name.startswith("model.onnx")] == ["model.onnx"]  # no .data
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 18
    assert set(exported.max_abs_diff) == {1, 7, 256} and max(exported.max_abs_diff.values()) <= 1e-4


def test_batch_axis_is_dynamic_and_input_is_raw_pixels(exported, small_checkpoint, small_prepared_dir):
    session = open_session(exported.onnx_path)
    (inp,) = session.get_inputs()
    assert inp.name == "pixels" and inp.shape[1:] == [1, 28, 28] and not isinstance(inp.shape[0], int)
    model, _ = load_checkpoint(small_checkpoint)
    images, labels = load_split(small_prepared_dir, "test")
    for batch in (3, 100):
        pixels = images[:batch].float()
        (logits,) = session.run(["logits"], {"pixels": pixels.numpy()})
        with torch.no_grad():
            assert np.abs(logits - model(pixels).numpy()).max() <= 1e-4
    (logits,) = session.run(["logits"], {"pixels": images.float().numpy()})
    assert (logits.argmax(1) == labels.numpy()).mean() > 0.8  # raw pixels in, no client-side normalisation


def test_metadata_describes_the_model(exported):
    meta = {p.key: p.value for p in onnx.load(str(exported.onnx_path)).metadata_props}
    assert json.loads(meta["labels"]) == [str(d) for d in range(10)]
    assert json.loads(meta["normalization"])["applied_in_graph"] is True
    assert meta["data_version"] == "abc123.dir" and meta["git_commit"] == "c" * 40 and meta["params_hash"] == "p" * 16
    assert json.loads(meta["metrics"])["n_test"] == 600
    assert {"input", "created", "model_args"} <= set(meta)
    spec = InputSpec.from_dict(json.loads(meta["input_spec"]))  # the data's contract, for the registry and the server
    assert spec.shape == (1, 28, 28) and spec.class_names == tuple(str(d) for d in range(10))
    assert read_input_spec(meta) == spec and meta["model_name"] == "model"  # run_export's default name


def test_parity_failure_is_reported(exported, small_checkpoint, small_prepared_dir):
    model, _ = load_checkpoint(small_checkpoint)
    with torch.no_grad():
        model.net.head[-1].bias += 1.0  # a model that no longer matches the file
    images, _ = load_split(small_prepared_dir, "test")
    with pytest.raises(ParityError, match=r"differs from PyTorch at batch 1: max \|diff\|"):
        check_parity(model, exported.onnx_path, images, atol=1e-4)


def _cut_test_split(source, prepared, n: int) -> None:
    import shutil

    shutil.copytree(source, prepared)
    keep_records(prepared, "test", slice(0, n))


def test_a_small_test_split_exports_with_parity_capped_by_its_size(exported, tmp_path, small_checkpoint,
                                                                  small_prepared_dir):
    """An image folder of a few hundred images has ~40 test images: parity runs at 1, 7 and 40, not 256."""
    prepared = tmp_path / "prepared"
    _cut_test_split(small_prepared_dir, prepared, 40)
    result = run_export(ExportConfig(int8=False, latency_runs=10), small_checkpoint, prepared,
                        exported.onnx_path.parent / "eval.json", tmp_path / "m.onnx", report_path=tmp_path / "x.json")
    assert set(result.max_abs_diff) == {1, 7, 40} and (tmp_path / "m.onnx").is_file()
    assert set(json.loads((tmp_path / "x.json").read_text())["parity_max_abs_diff"]) == {"1", "7", "40"}


def test_an_empty_test_split_is_a_clear_error_and_writes_nothing(exported, tmp_path, small_checkpoint,
                                                                 small_prepared_dir):
    prepared = tmp_path / "prepared"
    _cut_test_split(small_prepared_dir, prepared, 0)
    with pytest.raises(DataError, match="has no test images: .* need at least one"):
        run_export(ExportConfig(), small_checkpoint, prepared, exported.onnx_path.parent / "eval.json",
                   tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_report_has_serving_numbers_and_parity(exported):
    report = json.loads((exported.onnx_path.parent / "export.json").read_text())
    assert set(report["parity_max_abs_diff"]) == {"1", "7", "256"}
    assert max(report["parity_max_abs_diff"].values()) <= 1e-4
    serving = report["serving"]
    assert serving["provider"] == "CPUExecutionProvider"  # no GPU here; the provider ORT really used
    assert 0 < serving["latency_p50_ms"] <= serving["latency_p99_ms"] and serving["throughput_batch"] == 256
    assert serving["throughput_images_per_s"] > 0 and serving["size_bytes"] == exported.onnx_path.stat().st_size
    assert report["onnx_accuracy"] == pytest.approx(exported.onnx_accuracy) and report["n_test"] == 600
    names = [g["name"] for g in report["gates"]]
    assert names[:2] == ["gate.max_latency_p99_ms", "gate.max_size_mb"] and report["gates_passed"] is True
    # Every export gate is an upper bound: margin = threshold - value.
    assert all(g["margin"] == pytest.approx(g["threshold"] - g["value"], abs=1e-6) for g in report["gates"])


def test_int8_and_fp16_variants_are_evaluated_and_gated_on_their_drop(exported, small_prepared_dir):
    folder = exported.onnx_path.parent / "variants"
    index = json.loads((folder / VARIANTS_INDEX).read_text())
    assert set(index) == {"fp16", "int8"}
    images, labels = load_split(small_prepared_dir, "test")
    for name, entry in index.items():
        assert entry["drop"] == pytest.approx(exported.onnx_accuracy - entry["accuracy"], abs=1e-6)
        assert entry["gate"]["name"] == "export.max_quant_drop"
        assert entry["gate"]["value"] == pytest.approx(entry["drop"], abs=1e-6)
        assert entry["kept"] == (entry["drop"] <= ExportConfig().max_quant_drop) == (folder / entry["file"]).is_file()
        if entry["kept"]:  # a kept file is a checked model with metadata, whose accuracy is what the index says
            proto = onnx.load(str(folder / entry["file"]))
            onnx.checker.check_model(proto, full_check=True)
            meta = {p.key: p.value for p in proto.metadata_props}
            assert meta["variant"] == name and json.loads(meta["labels"]) == [str(d) for d in range(10)]
            pixels = images.float().numpy()
            (logits,) = open_session(folder / entry["file"]).run(["logits"], {"pixels": pixels})
            assert (logits.argmax(1) == labels.numpy()).mean() == pytest.approx(entry["accuracy"])
            assert entry["serving"]["latency_p99_ms"] > 0
    assert index["int8"]["size_bytes"] < exported.onnx_path.stat().st_size / 3  # int8 weights: ~4x smaller


def test_badly_calibrated_int8_is_rejected_with_its_drop(exported, tmp_path, small_prepared_dir):
    images, labels = load_split(small_prepared_dir, "test")
    black = torch.zeros(32, 1, 28, 28, dtype=torch.uint8)  # calibration that sees no ink: activation ranges collapse
    result = build_variant("int8", exported.onnx_path, tmp_path, exported.metadata, exported.onnx_accuracy, images,
                           labels, max_drop=0.005, device="cpu", calibration_images=black)
    assert not result.kept and not (tmp_path / "model.int8.onnx").exists()
    assert result.drop > 0.3 and result.drop == pytest.approx(exported.onnx_accuracy - result.accuracy)
    assert result.verdict.describe().startswith(
        "gate export.max_quant_drop not met: int8 test accuracy drop vs fp32 0.")
    assert result.to_dict()["kept"] is False and result.to_dict()["drop"] > 0.3


def test_failed_serving_gate_writes_the_report_and_exports_nothing(tmp_path, small_checkpoint, small_prepared_dir,
                                                                   exported, monkeypatch):
    import shutil

    import tuneline.tasks.ship.export

    # The exporter's output for this checkpoint is already on disk; reuse it (parity still runs for real) to save ~6 s.
    monkeypatch.setattr(tuneline.tasks.ship.export, "export_onnx_file", lambda model, example, path, opset: shutil.copyfile(
        exported.onnx_path, path))
    gates = GateConfig(max_size_mb=0.1)  # the default network (lean_cnn) is ~0.35 MB
    with pytest.raises(GateFailed, match=r"gate gate.max_size_mb FAILED: ONNX file size, MB 0\.\d{4} vs "
                                         r"threshold 0\.1000"):
        run_export(ExportConfig(), small_checkpoint, small_prepared_dir, exported.onnx_path.parent / "eval.json",
                   tmp_path / "model.onnx", variants_dir=tmp_path / "variants", report_path=tmp_path / "export.json",
                   gate_cfg=gates)
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "variants").exists()
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["gates_passed"] is False and report["gates"][1]["margin"] < 0


def latency_not_gated(monkeypatch) -> None:
    """Mutant: an export whose serving gates leave the p99 latency out (every fixture's 1000 ms bar hid it)."""
    import tuneline.tasks.ship.export

    real = tuneline.tasks.ship.export.check_serving_gates
    monkeypatch.setattr(tuneline.tasks.ship.export, "check_serving_gates",
                        lambda bench, cfg: [v for v in real(bench, cfg) if v.name != "gate.max_latency_p99_ms"])


@pytest.mark.parametrize("mutant", [None, pytest.param(latency_not_gated, id="latency-not-gated", marks=pytest.mark.xfail(
    strict=True, raises=(AssertionError, pytest.fail.Exception), reason="the mutant must fail this test"))])
def test_a_latency_bar_no_model_meets_fails_the_export_with_the_measured_p99(tmp_path, tiny_checkpoint,
                                                                            tiny_prepared_dir, tiny_onnx_model,
                                                                            mutant, monkeypatch):
    if mutant:
        mutant(monkeypatch)
    gates = GateConfig(max_latency_p99_ms=1e-6)  # a nanosecond: no session run is that fast
    with pytest.raises(GateFailed) as failure:
        run_export(ExportConfig(int8=False, latency_runs=10), tiny_checkpoint, tiny_prepared_dir,
                   tiny_onnx_model.onnx_path.parent / "eval.json", tmp_path / "model.onnx",
                   report_path=tmp_path / "export.json", gate_cfg=gates)
    report = json.loads((tmp_path / "export.json").read_text())
    serving, verdict = report["serving"], report["gates"][0]
    assert (verdict["name"], verdict["passed"], verdict["threshold"]) == ("gate.max_latency_p99_ms", False, 1e-6)
    assert verdict["value"] == round(serving["latency_p99_ms"], 6) > 0 and report["gates_passed"] is False
    p99 = serving["latency_p99_ms"]
    assert str(failure.value) == (f"gate gate.max_latency_p99_ms FAILED: p99 latency at batch 1, ms "
                                  f"({serving['provider']}) {p99:.4f} vs threshold 0.0000 (margin {1e-6 - p99:+.4f}): "
                                  "the model is not exported")
    assert not (tmp_path / "model.onnx").exists()
