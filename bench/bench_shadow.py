"""Benchmark: what shadowing the challenger costs the caller. `tuneline serve` with serve.challenger off vs shadow
(serve.shadow_percent, default 10), side by side, driven by `wrk` at 64 connections with V2 binary bodies.

Both arms serve the same registry: v0001 champion, v0002 challenger (--challenger, default the same file with other
weights is not needed: any second ONNX file of the same contract; default: --model again). Each arm is a fresh server
process, 1 s of unmeasured warm-up, then --duration s measured; the sequence repeats --runs times, alternating which
arm goes first. It prints p50 and p99 of each arm, the ratios (shadow / off), req/s, and, for the shadow arm, the
rows compared and dropped and the agreement (GET /v2/live). The issue-26 target: shadow adds at most 5% to p50 and
10% to p99, and compares at least 1,000 requests.

    python bench/bench_shadow.py --model models/model.onnx [--challenger other.onnx] [--images t10k-images-idx3-ubyte.gz]

Images: the first 256 of --images (an MNIST IDX file, .gz or not; default: $TUNELINE_DATA_MIRROR's test images).
Not a test.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_serving import REPO, free_port, make_registry, start, stop  # noqa: E402
from bench_serving_wrk import WARMUP_S, wrk, write_bodies  # noqa: E402

N_IMAGES = 256


def read_images(path: Path) -> np.ndarray:
    data = path.read_bytes()
    data = gzip.decompress(data) if path.suffix == ".gz" else data
    count, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, np.uint8, offset=16).reshape(count, 1, rows, cols)[:N_IMAGES].copy()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) the server process has used so far: a cost per request that other
    load on the machine changes far less than it changes latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "model.onnx")
    parser.add_argument("--challenger", type=Path, help="the challenger's ONNX file (default: --model)")
    mirror = Path(os.environ.get("TUNELINE_DATA_MIRROR", REPO.parent / "shared" / "data" / "MNIST" / "raw"))
    parser.add_argument("--images", type=Path, default=mirror / "t10k-images-idx3-ubyte.gz")
    parser.add_argument("--name", default="mnist")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per arm")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--percent", type=float, default=10.0, help="serve.shadow_percent of the shadow arm")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: install it (Debian/Ubuntu: apt-get install wrk)")

    images = read_images(args.images)
    results: dict[str, list[dict]] = {"off": [], "shadow": []}
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        tmp = Path(tmp)
        registry = make_registry(tmp / "registry", args.model, args.name)
        make_registry(registry, args.challenger or args.model, args.name, "v0002", "challenger")
        bodies = write_bodies(tmp / "binary", images, binary=True)
        for run in range(args.runs):
            arms = ["off", "shadow"] if run % 2 == 0 else ["shadow", "off"]
            for arm in arms:
                port = free_port()
                settings = ["-S", "serve.access_log=false", "-S", "serve.reload_poll_s=0.2",
                            "-S", f"serve.challenger={arm}", "-S", f"serve.shadow_percent={args.percent}"]
                proc = start([sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO), "serve",
                              "--registry", str(registry), "--port", str(port), *settings], port,
                              "/v2/health/ready", tmp / f"{arm}.log")
                try:
                    url = f"http://127.0.0.1:{port}/v2/models/{args.name}/infer"
                    if arm == "shadow":  # the challenger loads just after the champion: wait for it
                        live = f"http://127.0.0.1:{port}/v2/live/{args.name}"
                        while httpx.get(live).json()["challenger"] is None:
                            pass
                    wrk(url, bodies, args.connections, WARMUP_S)
                    before = httpx.get(f"http://127.0.0.1:{port}/v2/live/{args.name}").json()
                    cpu_before = cpu_seconds(proc.pid)
                    result = wrk(url, bodies, args.connections, args.duration)
                    result["cpu_s"] = cpu_seconds(proc.pid) - cpu_before
                    after = httpx.get(f"http://127.0.0.1:{port}/v2/live/{args.name}").json()
                finally:
                    stop(proc)
                challenger = after["challenger"] or {}
                earlier = before["challenger"] or {}
                result["p50_ms"], result["p99_ms"] = result["p50_us"] / 1e3, result["p99_us"] / 1e3
                result["requests_per_s"] = result["requests"] / (result["duration_us"] / 1e6)
                result["errors"] = result["status_errors"] + result["socket_errors"]
                result["compared"] = challenger.get("compared", 0) - earlier.get("compared", 0)
                result["dropped"] = challenger.get("dropped", 0) - earlier.get("dropped", 0)
                result["agreement"] = challenger.get("agreement")
                result["cpu_us_per_request"] = result["cpu_s"] / max(result["requests"], 1) * 1e6
                results[arm].append(result)
                print(f"run {run + 1} {arm:6s}: {json.dumps({k: result.get(k) for k in ('requests_per_s', 'p50_ms', 'p99_ms', 'cpu_us_per_request', 'errors', 'compared', 'dropped', 'agreement')})}",
                      flush=True)
    return report(results, args)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> int:
    print(f"\nshadow benchmark: wrk, {args.connections} connections, V2 binary bodies, {args.duration:g} s per arm, "
          f"{args.runs} runs; {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    print("| run | off p50 ms | shadow p50 ms | ratio | off p99 ms | shadow p99 ms | ratio | off req/s | shadow req/s "
          "| off CPU µs/req | shadow CPU µs/req | compared | dropped | agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run, (off, shadow) in enumerate(zip(results["off"], results["shadow"], strict=True), 1):
        print(f"| {run} | {off['p50_ms']:.2f} | {shadow['p50_ms']:.2f} | {shadow['p50_ms'] / off['p50_ms']:.3f} "
              f"| {off['p99_ms']:.2f} | {shadow['p99_ms']:.2f} | {shadow['p99_ms'] / off['p99_ms']:.3f} "
              f"| {off['requests_per_s']:.0f} | {shadow['requests_per_s']:.0f} | {off['cpu_us_per_request']:.0f} "
              f"| {shadow['cpu_us_per_request']:.0f} | {shadow['compared']} "
              f"| {shadow['dropped']} | {shadow['agreement']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
