"""Stage `export`: checkpoint -> one self-contained ONNX file with metadata, parity-checked against PyTorch,
measured on the serving device (latency, throughput, size: gated), plus optional FP16/INT8 variants.

The graph takes raw pixels (float32, 0..255, [batch, C, H, W] of the data's input spec) because normalisation
is part of the model; the metadata carries the input spec and the model name (core/onnx_metadata.py). The
file is only renamed into place after `onnx.checker`, the ONNX Runtime parity check and the serving gates pass.
Parity runs at batch sizes 1, 7 and 256, capped by the test split's size (at least one image is needed). A variant whose test accuracy drops more than export.max_quant_drop is rejected
(deleted, with its drop recorded) but does not fail the run: the FP32 model is still good.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

from tuneline.core.atomic import staged_dir, staged_file
from tuneline.tasks.ship.latency import OUTPUT_NAME, THROUGHPUT_BATCH, measure_serving, split_accuracy
from tuneline.core.onnx_session import Device, Provider, open_session
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.core.config.export import ExportConfig
from tuneline.core.config.gate import GateConfig
from tuneline.tasks.evaluate.gate import GateFailed, GateVerdict, check_serving_gates, failed
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.stream import DataAccess, SplitReader
from tuneline.core.errors import StageFailed
from tuneline.tasks.evaluate.report import EvalReport
from tuneline.tasks.ship.export_report import ExportReport
from tuneline.core.onnx_metadata import GRAPH_INPUTS, build_metadata
from tuneline.core.drift import PROFILE_KEY, PROFILE_ROWS, DriftProfile, build_profile, unk_id_of
from tuneline.core.spec import InputSpec
from tuneline.tasks.model.architectures import as_model_input
from tuneline.tasks.ship.quantize import VariantResult, build_variant

log = logging.getLogger(__name__)

PARITY_BATCHES = (1, 7, 256)  # capped by the test split's size: see parity_batches
SAMPLE_IMAGES = max(*PARITY_BATCHES, THROUGHPUT_BATCH)  # test images for parity and the serving measurements
CALIBRATION_SEED = 0  # the INT8 calibration sample's: the same file from the same data
VARIANTS_INDEX = "variants.json"  # inside the variants folder: every variant built, kept or not, with its drop


class ParityError(StageFailed, RuntimeError):
    """ONNX Runtime's logits differ from PyTorch's by more than export.parity_atol."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    max_abs_diff: dict[int, float]
    metadata: dict[str, str]
    onnx_accuracy: float = 0.0                  # the FP32 file's test accuracy through ONNX Runtime
    serving: dict | None = None                 # tuneline.tasks.ship.latency.measure_serving on the FP32 file
    variants: dict[str, VariantResult] | None = None
    verdicts: list[GateVerdict] | None = None   # serving gates + each variant's export.max_quant_drop


def export_onnx_file(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """`model` as one self-contained ONNX file with a dynamic batch axis (`example`: two or more rows, or the
    exporter may fix the batch at 1). The export stage and the tuner's serving cost (tasks/tune/serving_cost.py)
    both use it."""
    batch = torch.export.Dim("batch", min=1)
    input_name, _ = GRAPH_INPUTS[getattr(getattr(model, "args", None), "modality", "image")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about things that do not apply here
        torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=[OUTPUT_NAME],
                          dynamo=True, external_data=False, opset_version=opset,
                          dynamic_shapes=({0: batch},), verbose=False)


def parity_batches(n_images: int) -> tuple[int, ...]:
    """PARITY_BATCHES capped at the images there are, deduplicated: 40 test images -> (1, 7, 40)."""
    return tuple(sorted({min(batch, n_images) for batch in PARITY_BATCHES}))


def check_parity(model: torch.nn.Module, onnx_path: Path, images: torch.Tensor, atol: float) -> dict[int, float]:
    """Max |ORT - PyTorch| logits at each of parity_batches(len(images)), on real images; raises ParityError."""
    session = open_session(onnx_path, "cpu")  # the reference: PyTorch runs on CPU too
    input_name = session.get_inputs()[0].name
    diffs = {}
    for batch in parity_batches(len(images)):
        pixels = as_model_input(images[:batch])
        with torch.no_grad():
            expected = model(pixels).numpy()
        (actual,) = session.run([OUTPUT_NAME], {input_name: pixels.numpy()})
        diffs[batch] = float(abs(actual - expected).max())
        if actual.shape != expected.shape or diffs[batch] > atol:
            raise ParityError(f"export: ONNX Runtime differs from PyTorch at batch {batch}: max |diff| "
                              f"{diffs[batch]:.2e} > export.parity_atol {atol:g}; the file was not written")
    return diffs


def run_export(cfg: ExportConfig, model_path: Path, prepared_dir: Path, metrics_path: Path, onnx_path: Path, *,
               variants_dir: Path | None = None, report_path: Path | None = None,
               gate_cfg: GateConfig | None = None, device: Device = "cpu", threads: int = 0,
               provider: Provider = "auto", model_name: str = "model",
               access: DataAccess = DataAccess()) -> ExportResult:
    """Export, annotate, check, measure and atomically place the ONNX model (+ variants when `variants_dir`).

    `device`, `threads` and `provider` are the server's (serve.device, serve.threads, serve.provider): latency is
    measured as it will be served.
    With `gate_cfg`, a serving gate that fails raises GateFailed after writing `report_path`: nothing is placed.
    `model_name` (project.name) is recorded in the metadata beside the input spec.
    The test split is read as `access` says (resident or streamed batch by batch: tasks/data/stream.py); the parity
    check and the serving measurements use its first SAMPLE_IMAGES images.
    """
    model, checkpoint = load_checkpoint(model_path, "cpu")
    test = SplitReader(prepared_dir, "test", torch.device("cpu"), access)
    test.scoring_stage()
    images, labels = test.take(SAMPLE_IMAGES)
    if len(images) == 0:
        raise DataError(f"export: {prepared_dir} has no test images: the parity check and the serving measurements "
                         "need at least one; give the data a test split (or raise data.limit_test if it is set)")
    evaluation = EvalReport.read(Path(metrics_path))
    metadata = {
        **build_metadata(checkpoint, model_name, evaluation.headline()),
        PROFILE_KEY: drift_profile(model, checkpoint, prepared_dir).to_json(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "variant": "fp32",
    }
    with staged_file(Path(onnx_path)) as tmp:
        # Two rows even from a one-image split: an example batch of 1 would let the exporter fix the batch axis at 1.
        export_onnx_file(model, as_model_input(images[:1]).repeat(2, *[1] * (images.dim() - 1)), tmp, cfg.opset)
        proto = onnx.load(str(tmp))
        proto.producer_name = "tuneline"
        proto.doc_string = {"image": "Tuneline classifier: raw pixels (0..255) in, logits out; see metadata_props",
                            "audio": "Tuneline classifier: raw samples (-1..1) in, log-mel inside, logits out; see "
                                     "metadata_props",
                            "text": "Tuneline classifier: token ids of the tokenizer in metadata_props in, logits "
                                    "out"}[model.args.modality]
        onnx.helper.set_model_props(proto, metadata)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        diffs = check_parity(model, tmp, images, cfg.parity_atol)
        log.info("export: %s (opset %d), parity max |diff| %s", onnx_path, cfg.opset,
                 ", ".join(f"batch {b}: {d:.1e}" for b, d in diffs.items()))
        accuracy = split_accuracy(tmp, test, device)
        serving = measure_serving(tmp, images, device, cfg.latency_runs, threads, provider)
        log.info("export: ONNX Runtime on %s: test accuracy %.4f, p50 %.3f ms / p99 %.3f ms at batch 1, "
                 "%.0f images/s at batch %d, %.2f MB", serving["provider"], accuracy, serving["latency_p50_ms"],
                 serving["latency_p99_ms"], serving["throughput_images_per_s"], serving["throughput_batch"],
                 serving["size_bytes"] / 1e6)
        verdicts = check_serving_gates(serving, gate_cfg) if gate_cfg is not None else []
        report = ExportReport(opset=cfg.opset, parity_max_abs_diff={str(b): d for b, d in diffs.items()},
                              onnx_accuracy=round(accuracy, 6), n_test=len(test), serving=serving)
        if failed(verdicts):
            _write_report(report_path, replace(report, gates=verdicts))
            raise GateFailed(verdicts)
        variants: dict[str, VariantResult] = {}
        if variants_dir is not None:
            variants = _build_variants(cfg, tmp, Path(variants_dir), metadata, accuracy, prepared_dir, test, images,
                                       device, threads, provider)
            verdicts = verdicts + [v.verdict for v in variants.values()]
            report = replace(report, variants={name: v.to_dict() for name, v in variants.items()})
        _write_report(report_path, replace(report, gates=verdicts))
    return ExportResult(onnx_path=Path(onnx_path), max_abs_diff=diffs, metadata=metadata, onnx_accuracy=accuracy,
                        serving=serving, variants=variants, verdicts=verdicts)


def drift_profile(model: torch.nn.Module, checkpoint: dict, prepared_dir: Path) -> DriftProfile:
    """The reference profile the server scores live drift against (core/drift.py): a seeded sample of the train
    split and the model's probabilities for it."""
    train = SplitReader(prepared_dir, "train", torch.device("cpu"), resident=False)
    rows = train.sample(PROFILE_ROWS, seed=CALIBRATION_SEED)
    with torch.no_grad():
        probabilities = torch.cat([torch.softmax(model(as_model_input(rows[i:i + 256])), dim=1)
                                   for i in range(0, len(rows), 256)]).numpy()
    modality = model.args.modality
    pad_id, unk_id = 0, None
    if modality == "text":
        spec = InputSpec.from_dict(checkpoint["model_args"]["input"]["spec"])
        pad_id, unk_id = spec.text.pad_id, unk_id_of(checkpoint["model_args"]["input"]["tokenizer"])
    return build_profile(modality, rows.numpy(), probabilities, probabilities.shape[1], pad_id, unk_id)


def _build_variants(cfg: ExportConfig, fp32_path: Path, variants_dir: Path, metadata: dict[str, str],
                    accuracy: float, prepared_dir: Path, test: SplitReader, sample: torch.Tensor, device: Device,
                    threads: int, provider: Provider) -> dict[str, VariantResult]:
    """Each enabled variant, built and gated in a staged folder that replaces `variants_dir` whole."""
    enabled = [name for name in ("fp16", "int8") if getattr(cfg, name)]
    calibration = None
    if "int8" in enabled:
        # A seeded sample gathered from the shards: the train split is never read whole for it.
        train = SplitReader(prepared_dir, "train", torch.device("cpu"), resident=False)
        calibration = train.sample(cfg.calibration_images, seed=CALIBRATION_SEED)
    results = {}
    with staged_dir(variants_dir) as staging:
        for name in enabled:
            results[name] = build_variant(name, fp32_path, staging, metadata, accuracy, test, None,
                                          cfg.max_quant_drop, device, calibration)
            if results[name].kept:  # its serving cost too, for choosing serve.model_file (not gated)
                results[name] = replace(results[name], serving=measure_serving(
                    staging / results[name].file, sample, device, cfg.latency_runs, threads, provider))
        # Always written, so the folder exists (a DVC output) and says what was built even when nothing was kept.
        index = {name: r.to_dict() for name, r in results.items()}
        (staging / VARIANTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return results


def _write_report(path: Path | None, report: ExportReport) -> None:
    if path is not None:
        report.write(Path(path))
