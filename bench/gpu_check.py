"""Every CUDA path of the project in one go, one JSON report (run through bench/gpu_check.sh).

Steps, each with its own time limit (all together under 8 minutes on one GPU):

    train_bf16_compile  bench/bench_train.py on CUDA (bf16 + channels_last + torch.compile: the CUDA preset)
    packed_k16          bench/bench_packed.py on CUDA with K=16 trials per pack
    export_cuda         a real MNIST slice trained, evaluated and exported with serve/export device cuda: parity
                        and latency measured through the CUDA execution provider
    serving_gpu         bench/bench_serving.py against that model with TUNELINE_SERVE_DEVICE=cuda

Where a step cannot run it is reported as skipped with the reason ("skipped: no CUDAExecutionProvider",
"skipped: no CUDA device for torch"), never as a number: a CPU-only machine gets a report of skips in seconds.
A step that runs and fails is "failed" with the tail of its output; the exit status is 1 if any step failed.

    bench/gpu_check.sh [--out gpu_check.json] [--only export_cuda,serving_gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("train_bf16_compile", "packed_k16", "export_cuda", "serving_gpu")
LIMIT_S = {"train_bf16_compile": 150, "packed_k16": 120, "export_cuda": 90, "serving_gpu": 90}  # sum: 7.5 min


def probe() -> dict:
    """What CUDA this machine really has: torch's device, ONNX Runtime's providers, and whether CUDA loads."""
    found: dict = {"torch_cuda": False, "torch_device": None, "ort_providers": [], "ort_cuda_loads": False,
                   "ort_reason": None}
    try:
        import torch

        found["torch_cuda"] = bool(torch.cuda.is_available())
        found["torch_device"] = torch.cuda.get_device_name(0) if found["torch_cuda"] else None
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the report says why a step was skipped
        found["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import onnxruntime as ort

        from tasks.ship.onnx_session import DeviceError, resolve_providers

        found["ort_providers"] = ort.get_available_providers()
        ort.set_default_logger_severity(4)  # a CUDA library that does not load is the expected answer here
        try:
            found["ort_cuda_loads"] = resolve_providers("cuda")[0] == "CUDAExecutionProvider"
        except DeviceError as exc:
            found["ort_reason"] = str(exc)
    except Exception as exc:  # noqa: BLE001
        found["ort_reason"] = f"{type(exc).__name__}: {exc}"
    return found


def skip_reason(step: str, cuda: dict) -> str | None:
    if step in ("train_bf16_compile", "packed_k16") and not cuda["torch_cuda"]:
        return "skipped: no CUDA device for torch (torch.cuda.is_available() is False)"
    if step in ("export_cuda", "serving_gpu") and not cuda["ort_cuda_loads"]:
        if "CUDAExecutionProvider" not in cuda["ort_providers"]:
            return "skipped: no CUDAExecutionProvider"
        return f"skipped: no CUDAExecutionProvider (listed, but it does not load: {cuda['ort_reason']})"
    return None


def run(command: list[str], limit_s: float, env: dict | None = None) -> dict:
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit_s, check=False,
                              env={**os.environ, **(env or {})})
        status, output = ("ok" if done.returncode == 0 else "failed"), done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status, output = "failed", f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {limit_s} s"
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "command": " ".join(command),
            "output_tail": "\n".join(str(output).splitlines()[-30:])}


def export_cuda(work: Path) -> dict:
    """Train the seed CNN briefly on a real MNIST slice, evaluate it, export it measuring on CUDA."""
    started = time.monotonic()
    from tasks.config import DataConfig, ExportConfig, GateConfig, ModelConfig, TrainConfig
    from tasks.data.fetch import run_fetch
    from tasks.data.prepare import run_prepare
    from tasks.evaluate.evaluate import run_evaluate
    from tasks.lineage import Lineage
    from tasks.ship.export import run_export
    from tasks.train.loop import run_train

    mirror = os.environ.get("TUNELINE_DATA_MIRROR") or str(REPO.parent / "shared" / "data" / "MNIST" / "raw")
    data = DataConfig(limit_train=6000, limit_test=1000)
    run_fetch(data, work / "raw", mirror=mirror)
    run_prepare(data, work / "raw", work / "prepared")
    import torch

    train = TrainConfig(epochs=1, batch_size=128, device="cuda" if torch.cuda.is_available() else "cpu")
    run_train(ModelConfig(), train, work / "prepared", work / "model.pt", work / "history.csv",
              Lineage("gpu-check", "p" * 16, "c" * 40))
    run_evaluate(work / "model.pt", work / "prepared", work / "eval.json", work / "confusion.csv",
                 GateConfig(min_accuracy=0.5), train, enforce=False)
    result = run_export(ExportConfig(), work / "model.pt", work / "prepared", work / "eval.json", work / "model.onnx",
                        gate_cfg=GateConfig(min_accuracy=0.5, max_latency_p99_ms=1000.0), device="cuda",
                        model_name="mnist")
    shown = {k: v for k, v in vars(result).items() if isinstance(v, str | int | float | bool | type(None))}
    return {"status": "ok", "seconds": round(time.monotonic() - started, 1), "result": shown,
            "onnx": str(result.onnx_path), "prepared": str(work / "prepared")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check.json", help="the JSON report")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(STEPS)}")
    args = parser.parse_args(argv)
    steps = args.only.split(",") if args.only else list(STEPS)
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--only: unknown steps {unknown}; valid: {', '.join(STEPS)}")
    started = time.monotonic()
    cuda = probe()
    report: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
                    "python": platform.python_version(), "cuda": cuda, "steps": {}}
    work = Path(tempfile.mkdtemp(prefix="tuneline-gpu-check-"))
    py = sys.executable
    for step in steps:
        reason = skip_reason(step, cuda)
        if reason is not None:
            report["steps"][step] = {"status": "skipped", "reason": reason}
        elif step == "train_bf16_compile":
            report["steps"][step] = run([py, "bench/bench_train.py", "--device", "cuda", "--epochs", "2",
                                         "--seed-epochs", "1"], LIMIT_S[step])
        elif step == "packed_k16":
            report["steps"][step] = run([py, "bench/bench_packed.py", "--device", "cuda", "--pack", "16", "--trials",
                                         "16", "--epochs", "1", "--pruners", "none"], LIMIT_S[step])
        elif step == "export_cuda":
            try:
                report["steps"][step] = export_cuda(work)
            except Exception as exc:  # noqa: BLE001 - the report carries the failure
                report["steps"][step] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        elif step == "serving_gpu":
            exported = report["steps"].get("export_cuda", {})
            if exported.get("status") != "ok":
                report["steps"][step] = {"status": "skipped", "reason": "skipped: needs the export_cuda step's model"}
            else:
                report["steps"][step] = run([py, "bench/bench_serving.py", "--model", exported["onnx"], "--prepared",
                                             exported["prepared"], "--duration", "4", "--warmup", "1",
                                             "--concurrency", "1", "64"], LIMIT_S[step],
                                            env={"TUNELINE_SERVE_DEVICE": "cuda"})
    report["total_s"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for step, outcome in report["steps"].items():
        print(f"{step:20s} {outcome['status']:8s} {outcome.get('reason') or outcome.get('seconds', '')}")
    print(f"report: {args.out} ({report['total_s']} s)")
    return 1 if any(s["status"] == "failed" for s in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
