"""Which file of a registry version to serve: serve.precision against what the export measured.

The export report's measurements (tasks/ship/export_report.py: `serving` of model.onnx, `variants` with each
kept variant's accuracy drop, gate and `serving`) are copied into the version's card by promote; this module
reads them from there. `auto` serves model.fp16.onnx only where it pays: the server runs on a GPU provider, the
version holds the file, the export kept it (its accuracy drop within export.max_quant_drop) and measured it on
that same provider at least as fast as the FP32 file (batch-1 p50 and batch-256 throughput); otherwise
serve.model_file. FP16 on CPU is not tried: ONNX Runtime's CPU kernels mostly run it through casts.
The FP16 file keeps float32 inputs and outputs (tasks/ship/quantize.py), so clients see the same V2 metadata
whichever file is served; the loader checks the graph's I/O types all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneline.serving.errors import LoadError
from tuneline.core.onnx_session import GPU_PROVIDERS
from tuneline.core.registry_layout import MODEL_FILE, VARIANT_FILES

FP16_FILE = VARIANT_FILES["fp16"]


@dataclass(frozen=True)
class FileChoice:
    file: str       # the file of the version to load
    precision: str  # "fp32", "fp16", or the variant serve.model_file names ("int8")
    reason: str     # one line for the load log


def _precision_of(file: str) -> str:
    return next((name for name, path in VARIANT_FILES.items() if path == file), "fp32")


def choose_file(card: dict, precision: str, model_file: str, provider: str) -> FileChoice:
    """The file to serve for serve.precision=`precision` and serve.model_file=`model_file` on `provider` (the
    provider the server's sessions lead with); LoadError when serve.precision=fp16 and the version has no FP16 file."""
    version = card.get("version", "?")
    if precision == "fp16":
        if FP16_FILE not in card.get("files", {}):
            raise LoadError(f"{version}: serve.precision=fp16 but this version has no {FP16_FILE} (export.fp16 was "
                            "off, or its accuracy drop failed export.max_quant_drop): set serve.precision=auto or "
                            "fp32, or re-export with export.fp16: true", reason="missing")
        return FileChoice(FP16_FILE, "fp16", "serve.precision=fp16")
    if precision == "fp32" or model_file != MODEL_FILE:
        why = "serve.precision=fp32" if precision == "fp32" else f"serve.model_file={model_file}"
        return FileChoice(model_file, _precision_of(model_file), why)
    why_not = _fp16_does_not_pay(card, provider)
    if why_not is None:
        return FileChoice(FP16_FILE, "fp16", f"serve.precision=auto: the export measured {FP16_FILE} on {provider} "
                                             "at least as fast as FP32, within export.max_quant_drop")
    return FileChoice(model_file, "fp32", f"serve.precision=auto: {why_not}")


def _fp16_does_not_pay(card: dict, provider: str) -> str | None:
    """Why auto keeps FP32 here, or None when the card shows FP16 pays on `provider`."""
    if provider not in GPU_PROVIDERS:
        return f"FP16 is served on a GPU provider only (this server runs on {provider})"
    metrics = card.get("metrics") or {}
    variant = (metrics.get("variants") or {}).get("fp16")
    if not isinstance(variant, dict) or FP16_FILE not in card.get("files", {}):
        return f"the version holds no {FP16_FILE} (export.fp16 off, or rejected on its accuracy drop)"
    if not variant.get("kept") or not (variant.get("gate") or {}).get("passed", False):
        return f"the export rejected {FP16_FILE} on export.max_quant_drop (drop {variant.get('drop')})"
    fp32, fp16 = metrics.get("serving") or {}, variant.get("serving") or {}
    measured = {fp32.get("provider"), fp16.get("provider")}
    if measured != {provider}:
        return (f"the export measured FP32 on {fp32.get('provider')} and FP16 on {fp16.get('provider')}, not on "
                f"{provider}: export with serve.device/serve.provider as served")
    try:
        faster = (fp16["latency_p50_ms"] <= fp32["latency_p50_ms"]
                  and fp16["throughput_images_per_s"] >= fp32["throughput_images_per_s"])
    except (KeyError, TypeError):
        return "the export report lacks the latency/throughput of FP32 or FP16"
    if not faster:
        return (f"FP16 was not faster on {provider} (p50 {fp16['latency_p50_ms']} vs {fp32['latency_p50_ms']} ms, "
                f"{fp16['throughput_images_per_s']} vs {fp32['throughput_images_per_s']} images/s)")
    return None
