"""Stage `export`: checkpoint -> one self-contained ONNX file with metadata, parity-checked against PyTorch.

The graph takes raw pixels (float32, 0..255, [batch, 1, 28, 28]) because normalisation is part of the
model; the file is only renamed into place after `onnx.checker` and the ONNX Runtime parity check pass.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

from tasks.atomic import staged_file
from tasks.checkpoint import load_checkpoint
from tasks.config import ExportConfig
from tasks.prepare import load_split

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
PARITY_BATCHES = (1, 7, 256)


class ParityError(RuntimeError):
    """ONNX Runtime's logits differ from PyTorch's by more than export.parity_atol."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    max_abs_diff: dict[int, float]
    metadata: dict[str, str]


def _onnx_export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about things that do not apply here
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamo=True, external_data=False, opset_version=opset,
                          dynamic_shapes={"pixels": {0: batch}}, verbose=False)


def ort_session(path: Path, providers: list[str] | None = None):
    """An ONNX Runtime session on the given providers (CPU by default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CUDA provider's absence is expected on CPU machines
    return ort.InferenceSession(str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])


def check_parity(model: torch.nn.Module, onnx_path: Path, images: torch.Tensor, atol: float) -> dict[int, float]:
    """Max |ORT - PyTorch| logits at each batch size of PARITY_BATCHES, on real images; raises ParityError."""
    session = ort_session(onnx_path)
    diffs = {}
    for batch in PARITY_BATCHES:
        pixels = images[:batch].unsqueeze(1).float()
        with torch.no_grad():
            expected = model(pixels).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
        diffs[batch] = float(abs(actual - expected).max())
        if actual.shape != expected.shape or diffs[batch] > atol:
            raise ParityError(f"export: ONNX Runtime differs from PyTorch at batch {batch}: max |diff| "
                              f"{diffs[batch]:.2e} > export.parity_atol {atol:g}; the file was not written")
    return diffs


def run_export(cfg: ExportConfig, model_path: Path, prepared_dir: Path, metrics_path: Path, onnx_path: Path) -> ExportResult:
    """Export, annotate, check and atomically place the ONNX model."""
    model, checkpoint = load_checkpoint(model_path, "cpu")
    images, _ = load_split(prepared_dir, "test")
    if len(images) < max(PARITY_BATCHES):
        raise ValueError(f"export: parity needs {max(PARITY_BATCHES)} test images, {prepared_dir} has {len(images)}: "
                         "raise data.limit_test")
    metrics = json.loads(Path(metrics_path).read_text())
    args = checkpoint["model_args"]
    metadata = {
        "labels": json.dumps(checkpoint["classes"]),
        "input": json.dumps({"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", *args["image_shape"]],
                             "range": [0, 255], "layout": "NCHW"}),
        "normalization": json.dumps({"mean": args["mean"], "std": args["std"], "applied_in_graph": True}),
        "model_args": json.dumps(args),
        "data_version": checkpoint["lineage"]["data_version"],
        "params_hash": checkpoint["lineage"]["params_hash"],
        "git_commit": checkpoint["lineage"]["git_commit"],
        "metrics": json.dumps({k: metrics[k] for k in ("accuracy", "loss", "n_test")}),
        "params": json.dumps(checkpoint.get("params", {})),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with staged_file(Path(onnx_path)) as tmp:
        _onnx_export(model, images[:2].unsqueeze(1).float(), tmp, cfg.opset)
        proto = onnx.load(str(tmp))
        proto.producer_name = "tuneline"
        proto.doc_string = "Tuneline classifier: raw pixels (0..255) in, logits out; see metadata_props"
        onnx.helper.set_model_props(proto, metadata)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        diffs = check_parity(model, tmp, images, cfg.parity_atol)
    log.info("export: %s (opset %d), parity max |diff| %s", onnx_path, cfg.opset,
             ", ".join(f"batch {b}: {d:.1e}" for b, d in diffs.items()))
    return ExportResult(onnx_path=Path(onnx_path), max_abs_diff=diffs, metadata=metadata)
