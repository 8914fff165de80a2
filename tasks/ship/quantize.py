"""FP16 and INT8 variants of the exported model, each kept only if its test accuracy drop passes its gate.

INT8 is ONNX Runtime static quantization (QDQ format, per-channel int8 weights, int8 activations) whose
activation ranges are calibrated on training images, never test images: the test set only judges.
FP16 converts weights and compute to half precision but keeps float32 inputs and outputs, so a client
sends the same raw pixels to every variant.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from tuneline.tasks.data.stream import TensorSplit
from tuneline.tasks.ship.latency import as_pixels, split_accuracy
from tuneline.core.onnx_session import Device
from tuneline.core.registry_layout import VARIANT_FILES
from tuneline.tasks.evaluate.gate import GateVerdict, gate_max

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 64  # images per calibration run (memory only: the ranges are the same for any batch)


@dataclass(frozen=True)
class VariantResult:
    name: str              # "fp16" | "int8"
    file: str              # file name inside the variants folder (present only when kept)
    accuracy: float        # test accuracy of the variant
    drop: float            # FP32 ONNX test accuracy minus the variant's (positive: worse)
    size_bytes: int
    verdict: GateVerdict   # export.max_quant_drop on `drop`
    serving: dict | None = None  # tuneline.tasks.ship.latency.measure_serving of a kept variant

    @property
    def kept(self) -> bool:
        return self.verdict.passed

    def to_dict(self) -> dict:
        return {"file": self.file, "accuracy": round(self.accuracy, 6), "drop": round(self.drop, 6),
                "size_bytes": self.size_bytes, "kept": self.kept, "gate": self.verdict.to_dict(),
                "serving": self.serving}


def _topological_sort(graph: onnx.GraphProto) -> None:
    # The FP16 converter appends its input Casts at the end of the node list; ONNX requires producers first.
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError("quantize: FP16 graph has a cycle or a dangling input; cannot order its nodes")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
            pending.remove(node)
    del graph.node[:]
    graph.node.extend(ordered)


def make_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and compute, float32 inputs/outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _topological_sort(proto.graph)
    onnx.save_model(proto, str(dst), save_as_external_data=False)


def make_int8(src: Path, dst: Path, calibration_images: torch.Tensor) -> None:
    """Static INT8 (QDQ, per-channel weights), MinMax activation ranges from `calibration_images` (uint8 [N, H, W])."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            name = onnx.load(str(src)).graph.input[0].name  # pixels, samples or tokens
            self.batches = iter([{name: as_pixels(calibration_images[i:i + CALIBRATION_BATCH])}
                                 for i in range(0, len(calibration_images), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="tuneline-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # folds shapes: better QDQ placement
        quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=_float_front_end(prepared))


def _float_front_end(path: Path) -> list[str]:
    """The nodes of an audio model's log-mel front end (every node up to its first Log), kept in float: power spectra
    span six orders of magnitude, which 8-bit activations cannot hold (measured on FSDD: test accuracy 0.16 with
    them quantized). Empty for a graph without a Log (images, text)."""
    nodes = onnx.load(str(path)).graph.node
    first_log = next((i for i, node in enumerate(nodes) if node.op_type == "Log"), None)
    return [] if first_log is None else [node.name for node in nodes[:first_log + 1]]


def _finish(path: Path, metadata: dict[str, str], variant: str, extra: dict[str, str]) -> None:
    # The converters keep metadata unevenly; set it explicitly so every variant describes itself like model.onnx.
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**metadata, "variant": variant, **extra})
    proto.producer_name = "tuneline"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def build_variant(name: str, fp32_path: Path, out_dir: Path, metadata: dict[str, str], base_accuracy: float,
                  test_images, test_labels: torch.Tensor | None, max_drop: float, device: Device,
                  calibration_images: torch.Tensor | None = None) -> VariantResult:
    """Make one variant in `out_dir`, score it on the test split, gate its drop; a rejected file is deleted.

    The test split is `test_images` with `test_labels` (tensors), or a split reader (tasks/data/stream.py) when
    `test_labels` is None."""
    path = Path(out_dir) / VARIANT_FILES[name]
    if name == "int8":
        if calibration_images is None or not len(calibration_images):
            raise ValueError("quantize: INT8 needs calibration images (export.calibration_images training images)")
        make_int8(fp32_path, path, calibration_images)
        extra = {"quantization": f"static int8 QDQ, per-channel weights, MinMax on {len(calibration_images)} "
                                 "train images"}
    else:
        make_fp16(fp32_path, path)
        extra = {"quantization": "fp16 weights and compute, float32 inputs/outputs"}
    _finish(path, metadata, name, extra)
    test = test_images if test_labels is None else TensorSplit(test_images, test_labels)
    accuracy = split_accuracy(path, test, device)
    drop = base_accuracy - accuracy
    verdict = gate_max("export.max_quant_drop", f"{name} test accuracy drop vs fp32", drop, max_drop, blocking=False)
    result = VariantResult(name, path.name, accuracy, drop, path.stat().st_size, verdict)
    if not result.kept:
        path.unlink()
    log.info("export: %s variant %s: accuracy %.4f vs fp32 %.4f (drop %+.4f, max %.4f), %.2f MB", name,
             "kept" if result.kept else "REJECTED", accuracy, base_accuracy, drop, max_drop, result.size_bytes / 1e6)
    return result
