"""Benchmark: the Tuneline server vs a naive FastAPI endpoint, closed-loop, single-image requests, loopback.

Both servers run as subprocesses on this machine (one uvicorn worker each, access logs off); this process
is the load generator: C keep-alive connections, each sending its next request as soon as the previous
answer arrives, for --duration seconds after --warmup seconds. Every answer is checked (status 200 and the
argmax of its logits equal to the class ONNX Runtime gives for that image here); anything else is an error.

    python bench/bench_serving.py [--model models/model.onnx] [--prepared data/prepared] [--duration 6]

Any exported model: its name (metadata `model_name`, else `model`) and input shape come from its ONNX metadata,
and the images from the prepared test split it was trained for.

Baseline = what one writes first: `def infer(req: PydanticModel)` → np.asarray → session.run (ONNX Runtime
defaults) → `.tolist()`, JSON only. Ours = `tuneline serve` with its defaults, JSON (FP32 data) and binary
(UINT8 tensor, binary logits) requests. Not a test: it prints a table and the ratios.
"""

# No `from __future__ import annotations`: FastAPI must see the baseline's local pydantic classes as real types.
import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 256  # distinct real test images cycled through by the clients


# --- the naive baseline server (run as `bench_serving.py --baseline-server`) ----------------------------------
def model_contract(model_path: Path) -> tuple[str, tuple[int, ...]]:
    """(model name, per-image input shape) from the ONNX file's metadata, as the server reads them."""
    import onnx

    from tuneline.core.onnx_metadata import read_input_spec

    metadata = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    return metadata.get("model_name", "model"), read_input_spec(metadata, str(model_path)).shape


def baseline_app(model_path: Path):
    import onnxruntime as ort
    from fastapi import FastAPI
    from pydantic import BaseModel

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    _, row = model_contract(model_path)

    class Tensor(BaseModel):
        name: str
        shape: list[int]
        datatype: str
        data: list[float]

    class Request(BaseModel):
        inputs: list[Tensor]

    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: Request):
        tensor = request.inputs[0]
        pixels = np.asarray(tensor.data, dtype=np.float32).reshape(-1, *row)
        (logits,) = session.run(None, {input_name: pixels})
        return {"model_name": name, "outputs": [{"name": "logits", "shape": list(logits.shape), "datatype": "FP32",
                                                 "data": logits.ravel().tolist()}]}

    return app


# --- load generator -------------------------------------------------------------------------------------------
def build_requests(images: np.ndarray, port: int, binary: bool, name: str) -> list[bytes]:
    """Complete HTTP/1.1 requests, one per image (uint8 [N, C, H, W]), to model `name`."""
    requests = []
    for image in images:
        shape = [1, *image.shape]
        if binary:
            head = orjson.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "UINT8",
                                             "parameters": {"binary_data_size": image.size}}],
                                 "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
            body = head + image.tobytes()
            extra = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}\r\n"
        else:
            body = orjson.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32",
                                             "data": image.ravel().tolist()}], "outputs": [{"name": "logits"}]})
            extra = "Content-Type: application/json\r\n"
        requests.append(f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return requests


def predicted_class(body: bytes, header_length: int | None) -> int:
    head = body[:header_length] if header_length else body
    out = orjson.loads(head)["outputs"][0]
    if header_length:
        logits = np.frombuffer(body[header_length:header_length + out["parameters"]["binary_data_size"]], "<f4")
    else:
        logits = np.asarray(out["data"], dtype=np.float32)
    return int(logits.argmax())


async def client_loop(port: int, requests: list[bytes], expected: np.ndarray, start_index: int, stride: int,
                      warm_until: float, stop_at: float, latencies: list[float], errors: list[str]) -> None:
    reader = writer = None
    i = start_index
    while time.perf_counter() < stop_at:
        k = i % len(requests)
        i += stride
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            sent = time.perf_counter()
            writer.write(requests[k])
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = (line.partition(":") for line in lines[1:] if line)
            headers = {name.lower(): value.strip() for name, _, value in fields}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            done = time.perf_counter()
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:120]!r}")
            length = headers.get("inference-header-content-length")
            if predicted_class(body, int(length) if length else None) != expected[k]:
                raise RuntimeError("wrong class")
            if sent >= warm_until:
                latencies.append(done - sent)
        except Exception as exc:  # noqa: BLE001 - any failure is counted, then a fresh connection
            if time.perf_counter() >= warm_until:
                errors.append(f"{type(exc).__name__}: {exc}"[:160])
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def run_load(port: int, requests: list[bytes], expected: np.ndarray, concurrency: int, warmup: float,
                   duration: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + duration
    await asyncio.gather(*(client_loop(port, requests, expected, c, concurrency, warm_until, stop_at, latencies, errors)
                           for c in range(concurrency)))
    ms = np.asarray(latencies) * 1e3
    def percentile(q: float) -> float:
        return float(np.percentile(ms, q)) if len(ms) else float("nan")

    return {"throughput": len(latencies) / duration, "p50_ms": percentile(50), "p99_ms": percentile(99),
            "errors": len(errors), "first_error": errors[0] if errors else ""}


# --- orchestration --------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code in (200, 405):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} not ready after {timeout:.0f} s")


def make_registry(root: Path, model_path: Path, name: str, version_id: str = "v0001",
                  alias: str = "champion") -> Path:
    """Version `version_id` of model `name` holding `model_path`, with `alias` on it, in the registry layout the
    server reads (called again with v0002 and "challenger", it adds a challenger beside the champion)."""
    from tuneline.core.registry_layout import RegistryTree

    folder = RegistryTree(root).model_dir(name)
    data = model_path.read_bytes()
    version = folder / "versions" / version_id
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(data)
    (version / "card.json").write_text(json.dumps({"name": name, "version": version_id, "created": "",
                                                   "files": {"model.onnx": {"sha256": hashlib.sha256(data).hexdigest(),
                                                                            "bytes": len(data)}}}))
    (folder / "aliases").mkdir(exist_ok=True)
    (folder / "aliases" / f"{alias}.json").write_text(json.dumps({"version": version_id, "previous": [], "updated": ""}))
    return root


def start(cmd: list[str], port: int, ready_path: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_ready(port, ready_path, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "model.onnx")
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each cell")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.baseline_server:  # the child process that serves the baseline
        import uvicorn

        uvicorn.run(baseline_app(args.model), host="127.0.0.1", port=args.port, access_log=False, log_level="warning")
        return 0

    import onnxruntime as ort

    name, row = model_contract(args.model)
    from tuneline.tasks.data.shards import first_records  # numpy only: no torch in this process

    images = first_records(args.prepared, "test", N_IMAGES)[0]  # real test images of the model's data set
    images = np.ascontiguousarray(images.reshape(len(images), *row))
    check = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    (logits,) = check.run(None, {"pixels": images.astype(np.float32)})
    expected = logits.argmax(1)

    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        registry = make_registry(tmp / "registry", args.model, name)
        ours_port, base_port = free_port(), free_port()
        ours = start([sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO), "serve", "--registry", str(registry),
                      "--port", str(ours_port), "-S", "serve.access_log=false", "-S", "serve.reload_poll_s=0"],
                     ours_port, "/v2/health/ready", tmp / "ours.log")
        base = start([sys.executable, __file__, "--baseline-server", "--port", str(base_port),
                      "--model", str(args.model)], base_port, f"/v2/models/{name}/infer", tmp / "baseline.log")
        try:
            cells = [("baseline json", base, base_port, False), ("tuneline json", ours, ours_port, False),
                     ("tuneline binary", ours, ours_port, True)]
            for concurrency in args.concurrency:
                for cell, proc, port, binary in cells:  # `name` stays the model's: it is in every request's path
                    requests = build_requests(images, port, binary, name)
                    cpu_before = cpu_seconds(proc.pid)
                    r = asyncio.run(run_load(port, requests, expected, concurrency, args.warmup, args.duration))
                    # CPU per request over warm-up + measurement: robust to other load on a shared machine
                    served = r["throughput"] * (args.duration + args.warmup)
                    r["cpu_ms"] = (cpu_seconds(proc.pid) - cpu_before) * 1e3 / served if served else float("nan")
                    results[cell, concurrency] = r
                    print(f"  measured {cell:16s} c={concurrency:<3d} {r['throughput']:8.0f} req/s "
                          f"{r['cpu_ms']:.2f} server CPU ms/req", file=sys.stderr)
        finally:
            stop(ours)
            stop(base)
    report(results, args)
    return 0


def report(results: dict, args: argparse.Namespace) -> None:
    cpu = os.cpu_count()
    print(f"\nserving benchmark, {datetime.now(UTC):%Y-%m-%d}: {cpu} CPU cores, ONNX Runtime "
          f"{__import__('onnxruntime').__version__} on CPU, model {args.model.name}, closed loop, single-image "
          f"requests, {args.duration:g} s per cell after {args.warmup:g} s warm-up\n")
    print("| server | concurrency | req/s | p50 ms | p99 ms | errors | server CPU ms/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, concurrency), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {name} | {concurrency} | {r['throughput']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {r['errors']} | {r['cpu_ms']:.2f} |")
    errors = {k: r["first_error"] for k, r in results.items() if r["errors"]}
    if errors:
        print("\nfirst error per cell:", errors)
    if any(r["throughput"] == 0 for r in results.values()):
        return  # no ratios without answers
    print("\n| concurrency | ours json / baseline req/s | ours binary / baseline req/s | p99 json / baseline "
          "| p99 binary / baseline |")
    print("|---:|---:|---:|---:|---:|")
    for concurrency in args.concurrency:
        base = results["baseline json", concurrency]
        js, bi = results["tuneline json", concurrency], results["tuneline binary", concurrency]
        ratio = {k: r["throughput"] / base["throughput"] for k, r in (("json", js), ("binary", bi))}
        print(f"| {concurrency} | {ratio['json']:.2f}× | {ratio['binary']:.2f}× "
              f"| {js['p99_ms'] / base['p99_ms']:.2f} | {bi['p99_ms'] / base['p99_ms']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
