"""Every CUDA path of the project in one go, one JSON report (run through bench/gpu_check.sh).

Steps, each with its own time limit (all together under 8 minutes on one GPU):

    train_bf16_compile  bench/bench_train.py on CUDA (bf16 + channels_last + torch.compile: the CUDA preset)
    packed_k16          bench/bench_packed.py on CUDA with K=16 trials per pack
    export_cuda         a real MNIST slice trained, evaluated and exported with serve/export device cuda: parity
                        and latency measured through the CUDA execution provider, FP16 variant measured there too
    serving_gpu         bench/bench_serving.py against that model with TUNELINE_SERVE_DEVICE=cuda
    serving_io_binding  the server's run path on CUDA: I/O binding from page-locked buffers (pinned?), its logits
                        against the plain CUDA run, buffer reuse, and batch-1/64 times of both
    tensorrt            that model on the TensorRT provider (engine cache in the work folder): logits against CPU,
                        batch-1 p50, and a second session start that loads the cached engine; skipped with the
                        reason where TensorRT does not load
    fp16_serving        serve.precision=auto's choice from that export's report on CUDA, and the FP16 file served
                        (FP32 inputs/outputs, accuracy against FP32 on the test slice)
    provider_refusal    `tuneline serve --device cuda -S serve.provider=tensorrt` where TensorRT does not load: exit 2
                        and one line (skipped where it loads: nothing to refuse)

The steps after export_cuda run in a child process each (`gpu_check.py --inner STEP --work DIR`), so each has a
hard time limit; all together stay within TOTAL_S (a step that would start past it is skipped, saying so).

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
STEPS = ("train_bf16_compile", "packed_k16", "export_cuda", "serving_gpu", "serving_io_binding", "tensorrt",
         "fp16_serving", "provider_refusal")
LIMIT_S = {"train_bf16_compile": 120, "packed_k16": 100, "export_cuda": 80, "serving_gpu": 70,
           "serving_io_binding": 30, "tensorrt": 40, "fp16_serving": 20, "provider_refusal": 20}  # sum: 8 min
GPU = "cuda"  # the device every GPU step asks for (a smoke run of the steps' code on CPU sets "cpu")
TOTAL_S = 470  # the whole run, probe included: under 8 minutes
INNER = ("serving_io_binding", "tensorrt", "fp16_serving")  # run in a child process: a hard limit each
NEEDS_EXPORT = ("serving_gpu", *INNER)


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

        from tuneline.core.onnx_session import DeviceError, resolve_providers

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
    if step in ("export_cuda", *NEEDS_EXPORT, "provider_refusal") and not cuda["ort_cuda_loads"]:
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
    from tuneline.core.config.data import DataConfig
    from tuneline.core.config.export import ExportConfig
    from tuneline.core.config.gate import GateConfig
    from tuneline.core.config.model import ModelConfig
    from tuneline.core.config.train import TrainConfig
    from tuneline.tasks.data.fetch import run_fetch
    from tuneline.tasks.data.prepare import run_prepare
    from tuneline.tasks.evaluate.evaluate import run_evaluate
    from tuneline.tasks.lineage import Lineage
    from tuneline.tasks.ship.export import run_export
    from tuneline.tasks.train.loop import run_train

    mirror = os.environ.get("TUNELINE_DATA_MIRROR") or str(REPO.parent / "shared" / "data" / "MNIST" / "raw")
    data = DataConfig(limit_train=6000, limit_test=1000)
    run_fetch(data, work / "raw", mirror=mirror)
    run_prepare(data, work / "raw", work / "prepared")
    import torch

    train = TrainConfig(epochs=1, batch_size=128, device=GPU if torch.cuda.is_available() else "cpu")
    run_train(ModelConfig(), train, work / "prepared", work / "model.pt", work / "history.csv",
              Lineage("gpu-check", "p" * 16, "c" * 40))
    run_evaluate(work / "model.pt", work / "prepared", work / "eval.json", work / "confusion.csv",
                 GateConfig(min_accuracy=0.5), train, enforce=False)
    result = run_export(ExportConfig(fp16=True, int8=False), work / "model.pt", work / "prepared", work / "eval.json",
                        work / "model.onnx", variants_dir=work / "variants", report_path=work / "export.json",
                        gate_cfg=GateConfig(min_accuracy=0.5, max_latency_p99_ms=1000.0), device=GPU,
                        model_name="mnist")
    shown = {k: v for k, v in vars(result).items() if isinstance(v, str | int | float | bool | type(None))}
    return {"status": "ok", "seconds": round(time.monotonic() - started, 1), "result": shown,
            "onnx": str(result.onnx_path), "prepared": str(work / "prepared")}


def _test_pixels(work: Path, rows: int):
    """Real test images of the export_cuda slice as the server feeds them (float32 raw pixels), and their labels."""
    from tuneline.tasks.data.prepare import load_split

    images, labels = load_split(work / "prepared", "test")
    return images[:rows].float().numpy(), labels[:rows].numpy()


def _time_us(run, x, repeats: int) -> float:
    for _ in range(10):
        run(x)
    started = time.perf_counter()
    for _ in range(repeats):
        run(x)
    return round((time.perf_counter() - started) / repeats * 1e6, 1)


def serving_io_binding(work: Path) -> dict:
    """The server's CUDA run path against the plain one, on the exported model."""
    import numpy as np

    from tuneline.core.io_binding import BoundRunner, make_runner, plain_runner
    from tuneline.core.onnx_session import open_session

    session = open_session(work / "model.onnx", GPU)
    x, y = session.get_inputs()[0].name, session.get_outputs()[0].name
    bound, plain = make_runner(session, x, y, 64), plain_runner(session, x, y)
    if not isinstance(bound, BoundRunner):
        return {"status": "failed", "error": f"make_runner chose the plain run on {session.get_providers()}"}
    pixels, _ = _test_pixels(work, 256)
    diff = max(float(np.abs(bound(pixels[:n]) - plain(pixels[:n])).max()) for n in (1, 7, 64, 256))
    times = {f"{name}_batch{n}_us": _time_us(run, pixels[:n], 300 if n == 1 else 100)
             for n in (1, 64) for name, run in (("plain", plain), ("bound", bound))}
    ok = bound.pinned is True and diff <= 1e-4
    return {"status": "ok" if ok else "failed", "pinned": bound.pinned, "buffer_sets": bound.allocations,
            "max_abs_diff_vs_plain": diff, **times}


def tensorrt(work: Path) -> dict:
    """The exported model on the TensorRT provider, its engine cached in the work folder."""
    import numpy as np

    from tuneline.core.io_binding import make_runner
    from tuneline.core.onnx_session import TENSORRT, DeviceError, open_session, resolve_providers, tensorrt_options

    try:
        providers = resolve_providers("cuda", "tensorrt")
    except DeviceError as exc:
        return {"status": "skipped", "reason": f"skipped: TensorRT does not load here ({exc})"}
    options = {TENSORRT: tensorrt_options(work / "trt-cache")}
    started = time.monotonic()
    session = open_session(work / "model.onnx", "cuda", providers=providers, provider_options=options)
    run = make_runner(session, session.get_inputs()[0].name, session.get_outputs()[0].name, 64)
    pixels, _ = _test_pixels(work, 64)
    logits = run(pixels)  # builds the engine for this shape
    first_s = round(time.monotonic() - started, 1)
    reference = open_session(work / "model.onnx", "cpu")
    diff = float(np.abs(logits - reference.run(None, {reference.get_inputs()[0].name: pixels})[0]).max())
    started = time.monotonic()
    again = open_session(work / "model.onnx", "cuda", providers=providers, provider_options=options)
    again.run(None, {again.get_inputs()[0].name: pixels})
    return {"status": "ok" if diff <= 1e-2 else "failed", "providers": session.get_providers(),
            "first_start_and_run_s": first_s, "cached_start_and_run_s": round(time.monotonic() - started, 1),
            "max_abs_diff_vs_cpu": diff, "batch1_us": _time_us(run, pixels[:1], 300)}


def fp16_serving(work: Path) -> dict:
    """serve.precision=auto's choice from the export_cuda report, and the FP16 file served on CUDA."""
    from tuneline.serving.model_holder import build_model
    from tuneline.serving.precision import FP16_FILE, choose_file
    from tuneline.serving.repository import RegistryReader
    from tuneline.serving.settings import ServeSettings
    from tuneline.tasks.ship.export_report import ExportReport
    from tuneline.core.onnx_session import resolve_providers
    from tuneline.tasks.ship.registry import Registry

    report = ExportReport.read(work / "export.json")
    fp16 = work / "variants" / FP16_FILE
    if not fp16.exists():
        return {"status": "failed", "error": f"the export kept no FP16 variant: {report.variants.get('fp16')}"}
    root = work / "registry"
    version = Registry(root).register({"model.onnx": work / "model.onnx", FP16_FILE: fp16}, name="mnist",
                                      metrics={"serving": report.serving, "variants": report.variants}, gates=[],
                                      lineage={}, run_id=None)
    providers = resolve_providers(GPU)
    auto = choose_file(RegistryReader(root, "mnist").card(version), "auto", "model.onnx", providers[0])
    settings = ServeSettings(registry=root, device=GPU, precision="fp16")
    model = build_model(RegistryReader(root, "mnist"), version, settings, providers)
    pixels, labels = _test_pixels(work, 1000)
    accuracy = float((model.run(pixels)["class"] == labels).mean())
    io = [model.session.get_inputs()[0].type, model.session.get_outputs()[0].type]
    return {"status": "ok" if io == ["tensor(float)"] * 2 else "failed", "auto_choice": auto.file,
            "auto_reason": auto.reason, "fp32_serving": report.serving, "fp16_serving": report.variants["fp16"],
            "served": model.run_path, "graph_io": io, "fp16_accuracy_on_1000": accuracy}


def provider_refusal(py: str, limit_s: float) -> dict:
    """`tuneline serve` asked for TensorRT on CUDA where it does not load: exit 2, one line on stderr."""
    from tuneline.core.onnx_session import TENSORRT, resolve_providers

    if resolve_providers("auto", "tensorrt")[0] == TENSORRT:
        return {"status": "skipped", "reason": "skipped: TensorRT loads here, so there is nothing to refuse"}
    command = [py, "-c", "import sys; from tuneline.flows.cli import main; sys.exit(main(sys.argv[1:]))", "--project",
               str(REPO), "serve", "--device", "cuda", "-S", "serve.provider=tensorrt", "--registry",
               tempfile.mkdtemp(prefix="tuneline-refusal-")]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"the server neither refused nor exited within {limit_s} s"}
    line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    ok = done.returncode == 2 and line.startswith("tuneline: error: serve.device=cuda with serve.provider=tensorrt")
    return {"status": "ok" if ok else "failed", "seconds": round(time.monotonic() - started, 1),
            "exit": done.returncode, "error_line": line}


def run_inner(step: str, work: Path, limit_s: float) -> dict:
    """A step in a child process (a hard time limit); its result is the JSON line it prints (ONNX Runtime's own
    log lines on stderr come after it in the captured output)."""
    outcome = run([sys.executable, "bench/gpu_check.py", "--inner", step, "--work", str(work)], limit_s)
    for line in reversed(outcome["output_tail"].splitlines()):
        if line.startswith('{"status"'):
            return {**json.loads(line), "seconds": outcome["seconds"]}
    return outcome  # it failed before answering: the tail says why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check.json", help="the JSON report")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--inner", choices=INNER, help=argparse.SUPPRESS)  # one step, in the child process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        print(json.dumps(globals()[args.inner](args.work), default=str))
        return 0
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
        left = TOTAL_S - (time.monotonic() - started)
        limit = min(LIMIT_S[step], left)
        if reason is None and step in NEEDS_EXPORT and report["steps"].get("export_cuda", {}).get("status") != "ok":
            reason = "skipped: needs the export_cuda step's model"
        if reason is None and limit < 5:
            reason = f"skipped: the {TOTAL_S} s budget of the whole check is spent"
        if reason is not None:
            report["steps"][step] = {"status": "skipped", "reason": reason}
        elif step == "train_bf16_compile":
            report["steps"][step] = run([py, "bench/bench_train.py", "--device", "cuda", "--epochs", "2",
                                         "--seed-epochs", "1"], limit)
        elif step == "packed_k16":
            report["steps"][step] = run([py, "bench/bench_packed.py", "--device", "cuda", "--pack", "16", "--trials",
                                         "16", "--epochs", "1", "--pruners", "none"], limit)
        elif step == "export_cuda":
            try:
                report["steps"][step] = export_cuda(work)
            except Exception as exc:  # noqa: BLE001 - the report carries the failure
                report["steps"][step] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        elif step == "serving_gpu":
            exported = report["steps"]["export_cuda"]
            report["steps"][step] = run([py, "bench/bench_serving.py", "--model", exported["onnx"], "--prepared",
                                         exported["prepared"], "--duration", "4", "--warmup", "1",
                                         "--concurrency", "1", "64"], limit, env={"TUNELINE_SERVE_DEVICE": "cuda"})
        elif step in INNER:
            report["steps"][step] = run_inner(step, work, limit)
        elif step == "provider_refusal":
            report["steps"][step] = provider_refusal(py, limit)
    report["total_s"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for step, outcome in report["steps"].items():
        print(f"{step:20s} {outcome['status']:8s} {outcome.get('reason') or outcome.get('seconds', '')}")
    print(f"report: {args.out} ({report['total_s']} s)")
    return 1 if any(s["status"] == "failed" for s in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
