import json

import numpy as np
import onnx
import pytest
import torch

from tasks.checkpoint import load_checkpoint
from tasks.config import ExportConfig, GateConfig, TrainConfig
from tasks.evaluate import run_evaluate
from tasks.export import ParityError, check_parity, ort_session, run_export
from tasks.prepare import load_split


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_checkpoint, small_prepared_dir):
    out = tmp_path_factory.mktemp("export")
    run_evaluate(small_checkpoint, small_prepared_dir, out / "eval.json", out / "c.csv", GateConfig(min_accuracy=0.5),
                 TrainConfig(device="cpu"))
    result = run_export(ExportConfig(), small_checkpoint, small_prepared_dir, out / "eval.json", out / "model.onnx")
    return result


def test_export_is_one_checked_file_with_parity(exported):
    path = exported.onnx_path
    assert [p.name for p in path.parent.iterdir() if p.name.startswith("model.onnx")] == ["model.onnx"]  # no .data
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 18
    assert set(exported.max_abs_diff) == {1, 7, 256} and max(exported.max_abs_diff.values()) <= 1e-4


def test_batch_axis_is_dynamic_and_input_is_raw_pixels(exported, small_checkpoint, small_prepared_dir):
    session = ort_session(exported.onnx_path)
    (inp,) = session.get_inputs()
    assert inp.name == "pixels" and inp.shape[1:] == [1, 28, 28] and not isinstance(inp.shape[0], int)
    model, _ = load_checkpoint(small_checkpoint)
    images, labels = load_split(small_prepared_dir, "test")
    for batch in (3, 100):
        pixels = images[:batch].unsqueeze(1).float()
        (logits,) = session.run(["logits"], {"pixels": pixels.numpy()})
        with torch.no_grad():
            assert np.abs(logits - model(pixels).numpy()).max() <= 1e-4
    (logits,) = session.run(["logits"], {"pixels": images.unsqueeze(1).float().numpy()})
    assert (logits.argmax(1) == labels.numpy()).mean() > 0.8  # raw pixels in, no client-side normalisation


def test_metadata_describes_the_model(exported):
    meta = {p.key: p.value for p in onnx.load(str(exported.onnx_path)).metadata_props}
    assert json.loads(meta["labels"]) == [str(d) for d in range(10)]
    assert json.loads(meta["normalization"])["applied_in_graph"] is True
    assert meta["data_version"] == "abc123.dir" and meta["git_commit"] == "c" * 40 and meta["params_hash"] == "p" * 16
    assert json.loads(meta["metrics"])["n_test"] == 600
    assert {"input", "created", "model_args"} <= set(meta)


def test_parity_failure_is_reported(exported, small_checkpoint, small_prepared_dir):
    model, _ = load_checkpoint(small_checkpoint)
    with torch.no_grad():
        model.net.head[-1].bias += 1.0  # a model that no longer matches the file
    images, _ = load_split(small_prepared_dir, "test")
    with pytest.raises(ParityError, match=r"differs from PyTorch at batch 1: max \|diff\|"):
        check_parity(model, exported.onnx_path, images, atol=1e-4)


def test_too_few_test_images_for_parity_is_a_clear_error(tmp_path, small_checkpoint, small_prepared_dir):
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(small_prepared_dir, prepared)
    for kind in ("images", "labels"):
        path = prepared / f"test-{kind}.npy"
        np.save(path, np.load(path)[:100])
    with pytest.raises(ValueError, match="parity needs 256 test images"):
        run_export(ExportConfig(), small_checkpoint, prepared, tmp_path / "e.json", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
