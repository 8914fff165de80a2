"""Benchmark: are the first requests after a start, and after a reload, as fast as later ones?

One `tuneline serve` process (one worker; its other settings as params.yaml has them) on a registry holding the
given model. Straight after /v2/health/ready answers 200, --concurrency clients (asyncio, one keep-alive connection
each, V2 JSON bodies of real test images, every answer's class checked against ONNX Runtime offline) send:

1. the first --requests requests after the start;
2. --steady-requests more: the steady state;
3. then `POST /v2/repository/models/<name>/load` reloads the champion (a fresh session, warmed before it swaps in)
   and the first --requests requests after the reload.

Printed per phase: p50, p99 and max in ms; then the ratios of the first-after-start and first-after-reload p99 to
the steady p99. The issue-25 target is a ratio of at most 2 for both. Repeats --runs times, each on a fresh server.

    python bench/bench_cold_start.py --model models/model.onnx --prepared data/prepared [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_serving import (  # noqa: E402
    REPO,
    build_requests,
    free_port,
    make_registry,
    model_contract,
    predicted_class,
    start,
    stop,
)
from tuneline.tasks.data.shards import first_records  # noqa: E402  (numpy only: no torch in this process)


async def send(port: int, requests: list[bytes], expected: np.ndarray, concurrency: int, count: int) -> np.ndarray:
    """Latencies (ms) of the first `count` requests, `concurrency` at a time; any wrong answer or error raises."""
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_index < count:
                k, next_index = next_index, next_index + 1
                sent = time.perf_counter()
                writer.write(requests[k % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                latencies.append(time.perf_counter() - sent)
                status = int(lines[0].split()[1])
                if status != 200 or predicted_class(body, None) != expected[k % len(requests)]:
                    raise RuntimeError(f"request {k}: HTTP {status}, {body[:120]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return np.asarray(latencies) * 1e3


def summary(ms: np.ndarray) -> dict:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def one_run(args: argparse.Namespace, requests_for, expected: np.ndarray, name: str, registry: Path,
            log: Path) -> dict:
    port = free_port()
    proc = start([sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO), "serve", "--registry",
                  str(registry), "--port", str(port), "-S", "serve.workers=1", "-S", "serve.reload_poll_s=0",
                  *(f"-S{kv}" for kv in args.set)], port, "/v2/health/ready", log)
    try:
        requests = requests_for(port)
        phases = {"after start": asyncio.run(send(port, requests, expected, args.concurrency, args.requests)),
                  "steady": asyncio.run(send(port, requests, expected, args.concurrency, args.steady_requests))}
        reply = httpx.post(f"http://127.0.0.1:{port}/v2/repository/models/{name}/load", timeout=120)
        reply.raise_for_status()
        phases["after reload"] = asyncio.run(send(port, requests, expected, args.concurrency, args.requests))
    finally:
        stop(proc)
    return {phase: summary(ms) for phase, ms in phases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "model.onnx")
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000, help="requests measured after a start and a reload")
    parser.add_argument("--steady-requests", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="serve.KEY=VALUE")
    args = parser.parse_args()

    import onnxruntime as ort

    name, row = model_contract(args.model)
    images = np.ascontiguousarray(first_records(args.prepared, "test", 256)[0].reshape(-1, *row))
    check = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    (logits,) = check.run(None, {check.get_inputs()[0].name: images.astype(np.float32)})
    expected = logits.argmax(1)
    print(f"model {args.model} ({name}), {args.concurrency} clients, {args.requests} requests after a start and after "
          f"a reload, {args.steady_requests} steady", flush=True)
    worst = []
    with tempfile.TemporaryDirectory(prefix="bench-cold-start-") as tmp:
        registry = make_registry(Path(tmp) / "registry", args.model, name)
        for run in range(1, args.runs + 1):
            result = one_run(args, lambda port: build_requests(images, port, False, name), expected, name, registry,
                             Path(tmp) / f"server{run}.log")
            steady = result["steady"]["p99"]
            ratios = {phase: result[phase]["p99"] / steady for phase in ("after start", "after reload")}
            worst.append(max(ratios.values()))
            for phase, s in result.items():
                print(f"run {run} {phase:>12}: p50 {s['p50']:6.2f} ms  p99 {s['p99']:6.2f} ms  max {s['max']:7.2f} ms"
                      + (f"  p99 / steady p99 {ratios[phase]:.2f}" if phase in ratios else ""), flush=True)
    held = all(r <= 2.0 for r in worst)
    print(f"worst ratio per run: {', '.join(f'{r:.2f}' for r in worst)} (median {statistics.median(worst):.2f}); "
          f"target <= 2 in every run: {'held' if held else 'NOT held'}")
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
