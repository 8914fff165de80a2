"""Benchmark: the Tuneline server vs the naive FastAPI server, measured by `wrk` (a C load generator).

bench/bench_serving.py's clients are Python asyncio in a process of their own; this one drives the same two
servers with wrk (`apt-get install wrk`), so the load generator's cost is small and visible: its CPU time is
reported beside the server's. The servers run one at a time (the other is stopped), each on its own fresh
process, on the same cores; every cell is 1 s of unmeasured warm-up then --duration s of measurement; the
whole sequence repeats --runs times, alternating which server goes first.

    python bench/bench_serving_wrk.py --model models/model.onnx --prepared data/prepared [--runs 2]

Bodies are real test images of the model's data set (256, cycled): V2 JSON with FP32 data (both servers) and
the V2 binary extension with a UINT8 tensor and binary logits (ours only). Before measuring, every body's
answer is checked against ONNX Runtime's class for that image; wrk then counts non-2xx answers as errors.
Not a test: it prints a table, the ratios, and whether the issue-16 targets hold in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import (
    N_IMAGES,
    REPO,
    cpu_seconds,
    free_port,
    make_registry,
    model_contract,
    predicted_class,
    start,
    stop,
)

LUA = Path(__file__).resolve().parent / "wrk_infer.lua"
WARMUP_S = 1.0


def write_bodies(folder: Path, images: np.ndarray, binary: bool) -> Path:
    """One file per image plus index.txt, the layout wrk_infer.lua reads."""
    folder.mkdir(parents=True)
    lines = []
    for i, image in enumerate(images):
        shape = [1, *image.shape]
        if binary:
            head = orjson.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "UINT8",
                                             "parameters": {"binary_data_size": image.size}}],
                                 "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
            body, line = head + image.tobytes(), f"{i}.bin application/octet-stream {len(head)}"
        else:
            body = orjson.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32",
                                             "data": image.ravel().tolist()}], "outputs": [{"name": "logits"}]})
            line = f"{i}.bin application/json -"
        (folder / f"{i}.bin").write_bytes(body)
        lines.append(line)
    (folder / "index.txt").write_text("\n".join(lines) + "\n")
    return folder


def check_answers(url: str, bodies: Path, expected: np.ndarray) -> None:
    """Every body once, over HTTP: status 200 and ONNX Runtime's class, else the benchmark stops."""
    with httpx.Client(timeout=30) as client:
        for k, line in enumerate((bodies / "index.txt").read_text().splitlines()):
            file, content_type, header_length = line.split()
            headers = {"content-type": content_type}
            if header_length != "-":
                headers["inference-header-content-length"] = header_length
            r = client.post(url, content=(bodies / file).read_bytes(), headers=headers)
            if r.status_code != 200:
                raise SystemExit(f"{url}: HTTP {r.status_code} for image {k}: {r.text[:200]}")
            length = r.headers.get("inference-header-content-length")
            if predicted_class(r.content, int(length) if length else None) != expected[k]:
                raise SystemExit(f"{url}: wrong class for image {k}")


def wrk(url: str, bodies: Path, connections: int, duration: float) -> dict:
    """One wrk run (one thread: it keeps 64 connections busy at a fraction of a core); its JSON and CPU time."""
    path = url.split("127.0.0.1", 1)[1].split("/", 1)[1]
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(LUA),
           url, "--", str(bodies), "/" + path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.strip().splitlines()[-1])
    result["wrk_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of a process and its children (the workers of serve.workers > 1)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").glob("*") for c in (task / "children").read_text().split()]
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children)


def wait_all_ready(url: str, in_a_row: int = 32, timeout: float = 60.0) -> None:
    """Until `in_a_row` fresh connections in a row answer ready (each may reach any worker of serve.workers)."""
    deadline, ok = time.monotonic() + timeout, 0
    while ok < in_a_row:
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}: not ready on every connection after {timeout:.0f} s")
        ok = ok + 1 if httpx.get(url).status_code == 200 else 0
        if not ok:
            time.sleep(0.1)


def measure(proc: subprocess.Popen, url: str, bodies: Path, connections: int, duration: float) -> dict:
    wrk(url, bodies, connections, WARMUP_S)  # unmeasured: connections, caches, ONNX Runtime's first runs
    cpu_before = tree_cpu_seconds(proc.pid)
    r = wrk(url, bodies, connections, duration)
    served = r["requests"]
    seconds = r["duration_us"] / 1e6
    return {"rps": served / seconds, "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
            "errors": r["status_errors"] + r["socket_errors"],
            "server_cpu_ms": (tree_cpu_seconds(proc.pid) - cpu_before) * 1e3 / served if served else float("nan"),
            "wrk_cpu_ms": r["wrk_cpu_s"] * 1e3 / served if served else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "model.onnx")
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell")
    parser.add_argument("--runs", type=int, default=2, help="the whole sequence, this many times in a row")
    parser.add_argument("--json", type=Path, help="also write every cell here")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="a setting for our server (`tuneline serve -S`), e.g. serve.threads=1")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: install it (Debian/Ubuntu: apt-get install wrk)")

    import onnxruntime as ort

    name, row = model_contract(args.model)
    from tuneline.tasks.data.shards import first_records  # numpy only: no torch in this process

    images = np.ascontiguousarray(first_records(args.prepared, "test", N_IMAGES)[0].reshape(-1, *row))
    check = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    (logits,) = check.run(None, {check.get_inputs()[0].name: images.astype(np.float32)})
    expected = logits.argmax(1)

    cells = []  # (run, server, body kind, connections, result)
    with tempfile.TemporaryDirectory(prefix="bench-serving-wrk-") as tmp:
        tmp = Path(tmp)
        registry = make_registry(tmp / "registry", args.model, name)
        bodies = {"json": write_bodies(tmp / "json", images, False), "binary": write_bodies(tmp / "binary", images, True)}

        def ours(port: int) -> subprocess.Popen:
            return start([sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO), "serve", "--registry",
                          str(registry), "--port", str(port), "-S", "serve.access_log=false",
                          "-S", "serve.reload_poll_s=0", *(f"-S{kv}" for kv in args.set)], port, "/v2/health/ready", tmp / "ours.log")

        def baseline(port: int) -> subprocess.Popen:
            return start([sys.executable, str(REPO / "bench" / "bench_serving.py"), "--baseline-server",
                          "--port", str(port), "--model", str(args.model)], port, f"/v2/models/{name}/infer",
                         tmp / "baseline.log")

        servers = [("baseline", baseline, ["json"]), ("tuneline", ours, ["json", "binary"])]
        for run in range(1, args.runs + 1):
            for server, launch, kinds in (servers if run % 2 else servers[::-1]):
                port = free_port()
                proc = launch(port)
                url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
                try:
                    if server == "tuneline":  # serve.workers > 1: ready means one worker is; wait for every one
                        wait_all_ready(f"http://127.0.0.1:{port}/v2/health/ready")
                    for kind in kinds:
                        check_answers(url, bodies[kind], expected)
                        for c in args.connections:
                            r = measure(proc, url, bodies[kind], c, args.duration)
                            cells.append((run, server, kind, c, r))
                            print(f"  run {run} {server} {kind:6s} c={c:<3d} {r['rps']:7.0f} req/s p50 "
                                  f"{r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms, CPU ms/req server "
                                  f"{r['server_cpu_ms']:.2f} wrk {r['wrk_cpu_ms']:.3f}, load {os.getloadavg()[0]:.1f}",
                                  file=sys.stderr)
                finally:
                    stop(proc)
    report(cells, args)
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("run", "server", "body", "connections"), c[:4]), **c[4])
                                         for c in cells], indent=1))
    return 0


def report(cells: list, args: argparse.Namespace) -> None:
    print(f"\nserving benchmark with wrk, {datetime.now(UTC):%Y-%m-%d}: {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end, ONNX Runtime {__import__('onnxruntime').__version__} on CPU, "
          f"model {args.model.name}, {args.duration:g} s per cell after {WARMUP_S:g} s warm-up\n")
    print("| run | server | body | connections | req/s | p50 ms | p99 ms | errors | server CPU ms/req "
          "| wrk CPU ms/req |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run, server, kind, c, r in sorted(cells, key=lambda x: (x[0], x[3], x[1], x[2])):
        print(f"| {run} | {server} | {kind} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {r['errors']} | {r['server_cpu_ms']:.2f} | {r['wrk_cpu_ms']:.3f} |")
    by = {(run, server, kind, c): r for run, server, kind, c, r in cells}
    print("\n| run | connections | body | req/s ours / baseline | p50 ours / baseline | p99 ours / baseline |")
    print("|---:|---:|---|---:|---:|---:|")
    met = True
    for run in range(1, args.runs + 1):
        for c in args.connections:
            base = by[run, "baseline", "json", c]
            for kind in ("json", "binary"):
                ours = by[run, "tuneline", kind, c]
                rps, p50, p99 = (ours["rps"] / base["rps"], ours["p50_ms"] / base["p50_ms"],
                                 ours["p99_ms"] / base["p99_ms"])
                print(f"| {run} | {c} | {kind} | {rps:.2f}× | {p50:.2f} | {p99:.2f} |")
                if kind == "json":  # the targets are stated for like-for-like bodies
                    met &= (rps >= 4 and p99 <= 1 / 3) if c == 64 else (p50 <= 1.0) if c == 1 else True
                met &= ours["errors"] == 0 and base["errors"] == 0
    print(f"\ntargets (JSON, every run: 64 connections >= 4x req/s and p99 <= 1/3; 1 connection p50 <= baseline's; "
          f"no errors): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
