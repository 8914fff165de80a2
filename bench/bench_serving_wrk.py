"""Benchmark: the Tuneline server vs the naive FastAPI server, N processes each, measured by `wrk` (a C load generator).

bench/bench_serving.py's clients are Python asyncio in a process of their own; this one drives the same two
servers with wrk (`apt-get install wrk`), so the load generator's cost is small and visible: its CPU time is
reported beside the server's.

The two arms, each run as --workers N server processes (default 1; `auto`: one per CPU this process may use,
counted as `tuneline serve` counts them for serve.workers: auto):
- tuneline: `tuneline serve -S serve.workers=N` (N > 1: N whole servers sharing the port with SO_REUSEPORT, and a
  parent that only starts and watches them; serve.threads 0 then gives each usable CPUs // N ONNX Runtime
  threads), JSON (FP32 data) and V2 binary (UINT8 tensor, binary logits) bodies;
- baseline: bench_serving.py's naive FastAPI app (pydantic body, np.asarray, session.run with ONNX Runtime's
  defaults, .tolist()) under uvicorn with `workers=N` (N > 1: N spawned processes accepting on one socket, and
  uvicorn's supervisor), JSON bodies only.
Fairness: the bench gives both arms the same N (a -S serve.workers is refused, since it would change one arm
only), waits until every process of an arm is ready, counts each arm's serving processes under /proc (a
supervisor is not counted), stops if either is not N, and prints the count in every row; server CPU sums an
arm's whole process tree. The servers run one at a time (the other is stopped), each on fresh processes, on the
same cores; every cell is 1 s of unmeasured warm-up then --duration s of measurement; the whole sequence repeats
--runs times, alternating which server goes first.

    python bench/bench_serving_wrk.py --model models/model.onnx --prepared data/prepared [--runs 2] [--workers 1]

Bodies are real test images of the model's data set (256, cycled); their expected classes come from ONNX Runtime
run here, offline, on the same model. Every body's answer is checked once before the load. During each measured
cell a side client in this process posts the same bodies (cycled) at --check-rate requests/s, each on a fresh
connection (so that over a cell it reaches every process), while wrk keeps its connections busy, and checks
every answer: status 200 and ONNX Runtime's class. One wrong or failed answer fails the cell (FAIL and the count
in the table) and the bench exits 1 at the end. wrk counts non-2xx answers and socket errors (the errors column)
but reads no bodies; the side client's requests count in server CPU per request, not in req/s or latency.
Not a test: it prints a table, the ratios, and whether the issue-16 targets hold in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import orjson

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_serving import (
    N_IMAGES,
    REPO,
    baseline_app,
    cpu_seconds,
    free_port,
    make_registry,
    model_contract,
    predicted_class,
    start,
    stop,
)

LUA = BENCH / "wrk_infer.lua"
WARMUP_S = 1.0
BASELINE_MODEL_ENV = "BENCH_BASELINE_MODEL"  # the baseline's model, for each of uvicorn's worker processes
BASELINE_READY = "Application startup complete."  # uvicorn logs it once per process, once that process serves


def baseline_factory():
    """The naive baseline app (bench_serving.py's), for uvicorn's `factory=True` in each worker process."""
    return baseline_app(Path(os.environ[BASELINE_MODEL_ENV]))


def serve_baseline(model: Path, port: int, workers: int) -> None:
    """The baseline server: uvicorn with `workers` processes (1: this process serves; more: it supervises)."""
    import uvicorn

    os.environ[BASELINE_MODEL_ENV] = str(model.resolve())
    uvicorn.run("bench_serving_wrk:baseline_factory", factory=True, app_dir=str(BENCH), workers=workers,
                host="127.0.0.1", port=port, access_log=False, log_level="info")  # info: only start/stop lines


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


def read_bodies(bodies: Path) -> list[tuple[bytes, dict[str, str]]]:
    """(body, headers) per image, from write_bodies' folder: what wrk sends, for this process's own requests."""
    requests = []
    for line in (bodies / "index.txt").read_text().splitlines():
        file, content_type, header_length = line.split()
        headers = {"content-type": content_type, "connection": "close"}  # a fresh connection per request
        if header_length != "-":
            headers["inference-header-content-length"] = header_length
        requests.append(((bodies / file).read_bytes(), headers))
    return requests


def fresh_connection_client() -> httpx.Client:
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def answer_problem(client: httpx.Client, url: str, body: bytes, headers: dict[str, str], expected: int) -> str | None:
    """None if `body` is answered 200 with ONNX Runtime's class `expected`, else what went wrong."""
    try:
        r = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:160]
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:120]}"
    length = r.headers.get("inference-header-content-length")
    try:
        got = predicted_class(r.content, int(length) if length else None)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"unreadable answer ({type(exc).__name__}): {r.content[:80]!r}"
    return None if got == expected else f"class {got}, expected {expected}"


def check_answers(url: str, bodies: Path, expected: np.ndarray) -> None:
    """Every body once, before the load: status 200 and ONNX Runtime's class, else the benchmark stops."""
    with fresh_connection_client() as client:
        for k, (body, headers) in enumerate(read_bodies(bodies)):
            if problem := answer_problem(client, url, body, headers, int(expected[k])):
                raise SystemExit(f"{url}: image {k}: {problem}")


class AnswerChecker(threading.Thread):
    """The side client: while wrk drives the load, post known bodies at `rate` per second, one at a time, each
    on a fresh connection, and check every answer. `checked`, `wrong` and `first_wrong` once stopped."""

    def __init__(self, url: str, requests: list[tuple[bytes, dict[str, str]]], expected: np.ndarray, rate: float):
        super().__init__(daemon=True)
        self.url, self.requests, self.expected, self.interval = url, requests, expected, 1.0 / rate
        self.checked = self.wrong = 0
        self.first_wrong = ""
        self.halt = threading.Event()

    def run(self) -> None:
        k = random.randrange(len(self.requests))
        with fresh_connection_client() as client:
            due = time.monotonic()
            while not self.halt.is_set():
                body, headers = self.requests[k]
                problem = answer_problem(client, self.url, body, headers, int(self.expected[k]))
                self.checked += 1
                if problem:
                    self.wrong += 1
                    self.first_wrong = self.first_wrong or f"image {k}: {problem}"
                k = (k + 1) % len(self.requests)
                due = max(due + self.interval, time.monotonic())  # late: the next at once, no catching-up burst
                self.halt.wait(due - time.monotonic())

    def stop(self) -> None:
        self.halt.set()
        self.join()


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


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    found, todo = [], [pid]
    while todo:
        try:
            tasks = list(Path(f"/proc/{todo.pop()}/task").iterdir())
            children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
        except OSError:  # it has just exited
            children = []
        found += children
        todo += children
    return found


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of a process and every process below it (a supervisor and its workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in descendants(pid))


def serving_processes(pid: int) -> int:
    """How many processes of a server serve: the processes below it when there are any (it then only supervises:
    tuneline's serve.workers parent, uvicorn's supervisor), else itself. multiprocessing's resource tracker (which
    uvicorn's spawned workers start) serves nothing and is not counted."""
    def serves(child: int) -> bool:
        try:
            return b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            return False

    return sum(map(serves, descendants(pid))) or 1


def wait_all_ready(url: str, in_a_row: int = 32, timeout: float = 60.0) -> None:
    """Until `in_a_row` fresh connections in a row answer ready (each may reach any worker of serve.workers)."""
    deadline, ok = time.monotonic() + timeout, 0
    while ok < in_a_row:
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}: not ready on every connection after {timeout:.0f} s")
        ok = ok + 1 if httpx.get(url).status_code == 200 else 0
        if not ok:
            time.sleep(0.1)


def wait_log_lines(log: Path, text: str, count: int, timeout: float = 60.0) -> None:
    """Until `log` has `count` lines with `text` (uvicorn's startup line: one per worker process that serves)."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{log}: fewer than {count} processes logged {text!r} after {timeout:.0f} s")
        time.sleep(0.1)


def measure(proc: subprocess.Popen, url: str, bodies: Path, connections: int, duration: float,
            expected: np.ndarray, check_rate: float) -> dict:
    wrk(url, bodies, connections, WARMUP_S)  # unmeasured: connections, caches, ONNX Runtime's first runs
    checker = AnswerChecker(url, read_bodies(bodies), expected, check_rate)
    cpu_before = tree_cpu_seconds(proc.pid)
    checker.start()
    try:
        r = wrk(url, bodies, connections, duration)
    finally:
        checker.stop()
    cpu = tree_cpu_seconds(proc.pid) - cpu_before
    served = r["requests"]
    seconds = r["duration_us"] / 1e6
    answered = served + checker.checked  # the server's CPU went to the side client's requests too
    return {"rps": served / seconds, "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
            "errors": r["status_errors"] + r["socket_errors"],
            "checked": checker.checked, "wrong": checker.wrong, "first_wrong": checker.first_wrong,
            "processes": serving_processes(proc.pid),
            "server_cpu_ms": cpu * 1e3 / answered if answered else float("nan"),
            "wrk_cpu_ms": r["wrk_cpu_s"] * 1e3 / served if served else float("nan")}


def worker_count(text: str) -> int:
    """--workers: a count, or `auto` resolved as `tuneline serve` resolves serve.workers: auto."""
    from tuneline.core.config.serve import MAX_WORKERS
    from tuneline.serving.cpu_budget import plan_workers, usable_cpus

    if text == "auto":
        return plan_workers("auto", 0, usable_cpus())[0]
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count or auto") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{count}: from 1 to {MAX_WORKERS} (serve.workers' range)")
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "model.onnx")
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell")
    parser.add_argument("--runs", type=int, default=2, help="the whole sequence, this many times in a row")
    parser.add_argument("--workers", type=worker_count, default=1, metavar="N|auto",
                        help="server processes of each arm: tuneline's serve.workers and the baseline's uvicorn "
                             "workers (default 1; auto: one per usable CPU, as serve.workers: auto)")
    parser.add_argument("--check-rate", type=float, default=20.0, metavar="PER_S",
                        help="answers the side client checks per second during each measured cell (default 20)")
    parser.add_argument("--json", type=Path, help="also write every cell here")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="a setting for our server (`tuneline serve -S`), e.g. serve.threads=1")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.baseline_server:  # the child process that serves (or supervises) the baseline
        serve_baseline(args.model, args.port, args.workers)
        return 0
    from tuneline.core.config.overrides import parse_override

    if any(parse_override(kv)[0] == "serve.workers" for kv in args.set):
        parser.error("-S serve.workers would change our server only: use --workers N (or auto), which sets both arms")
    if args.check_rate <= 0:
        parser.error("--check-rate must be > 0: answers are checked during every cell")
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
            proc = start([sys.executable, "-m", "tuneline.flows.cli", "--project", str(REPO), "serve", "--registry",
                          str(registry), "--port", str(port), "-S", "serve.access_log=false",
                          "-S", "serve.reload_poll_s=0", *(f"-S{kv}" for kv in args.set),
                          "-S", f"serve.workers={args.workers}"], port, "/v2/health/ready", tmp / "ours.log")
            if args.workers > 1:  # ready means one worker is; wait for every one
                wait_all_ready(f"http://127.0.0.1:{port}/v2/health/ready")
            return proc

        def baseline(port: int) -> subprocess.Popen:
            log = tmp / "baseline.log"
            proc = start([sys.executable, str(Path(__file__).resolve()), "--baseline-server", "--port", str(port),
                          "--model", str(args.model), "--workers", str(args.workers)], port,
                         f"/v2/models/{name}/infer", log)
            wait_log_lines(log, BASELINE_READY, args.workers)  # ready means one process is; wait for every one
            return proc

        servers = [("baseline", baseline, ["json"]), ("tuneline", ours, ["json", "binary"])]
        for run in range(1, args.runs + 1):
            for server, launch, kinds in (servers if run % 2 else servers[::-1]):
                port = free_port()
                proc = launch(port)
                url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
                try:
                    if (processes := serving_processes(proc.pid)) != args.workers:
                        raise SystemExit(f"{server}: {processes} serving processes, not --workers {args.workers}")
                    for kind in kinds:
                        check_answers(url, bodies[kind], expected)
                        for c in args.connections:
                            r = measure(proc, url, bodies[kind], c, args.duration, expected, args.check_rate)
                            cells.append((run, server, kind, c, r))
                            print(f"  run {run} {server} ({r['processes']} proc) {kind:6s} c={c:<3d} {r['rps']:7.0f} "
                                  f"req/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms, CPU ms/req server "
                                  f"{r['server_cpu_ms']:.2f} wrk {r['wrk_cpu_ms']:.3f}, answers checked "
                                  f"{r['checked']} wrong {r['wrong']}, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
                finally:
                    stop(proc)
    failed = report(cells, args)
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("run", "server", "body", "connections"), c[:4]), **c[4])
                                         for c in cells], indent=1))
    return 1 if failed else 0


def cell_failed(r: dict, workers: int) -> bool:
    """A wrong or failed answer during the load, or not the asked number of serving processes."""
    return r["wrong"] > 0 or r["processes"] != workers


def report(cells: list, args: argparse.Namespace) -> int:
    """Print the tables; return the number of failed cells."""
    print(f"\nserving benchmark with wrk, {datetime.now(UTC):%Y-%m-%d}: {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end, ONNX Runtime {__import__('onnxruntime').__version__} on CPU, "
          f"model {args.model.name}, {args.duration:g} s per cell after {WARMUP_S:g} s warm-up, {args.workers} server "
          f"process(es) per arm, answers checked during the load at {args.check_rate:g}/s\n")
    print("| run | server | processes | body | connections | req/s | p50 ms | p99 ms | errors | answers checked "
          "during load | wrong | server CPU ms/req | wrk CPU ms/req |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run, server, kind, c, r in sorted(cells, key=lambda x: (x[0], x[3], x[1], x[2])):
        wrong = f"FAIL {r['wrong']}" if r["wrong"] else "0"
        print(f"| {run} | {server} | {r['processes']} | {kind} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} "
              f"| {r['p99_ms']:.2f} | {r['errors']} | {r['checked']} | {wrong} | {r['server_cpu_ms']:.2f} "
              f"| {r['wrk_cpu_ms']:.3f} |")
    by = {(run, server, kind, c): r for run, server, kind, c, r in cells}
    print("\n| run | connections | body | processes ours, baseline | req/s ours / baseline | p50 ours / baseline "
          "| p99 ours / baseline |")
    print("|---:|---:|---|---|---:|---:|---:|")
    met = True
    for run in range(1, args.runs + 1):
        for c in args.connections:
            base = by[run, "baseline", "json", c]
            for kind in ("json", "binary"):
                ours = by[run, "tuneline", kind, c]
                rps, p50, p99 = (ours["rps"] / base["rps"], ours["p50_ms"] / base["p50_ms"],
                                 ours["p99_ms"] / base["p99_ms"])
                print(f"| {run} | {c} | {kind} | {ours['processes']}, {base['processes']} | {rps:.2f}× | {p50:.2f} "
                      f"| {p99:.2f} |")
                if kind == "json":  # the targets are stated for like-for-like bodies
                    met &= (rps >= 4 and p99 <= 1 / 3) if c == 64 else (p50 <= 1.0) if c == 1 else True
                met &= ours["errors"] == 0 and base["errors"] == 0 and ours["wrong"] == 0 and base["wrong"] == 0
    print(f"\ntargets (JSON, every run: 64 connections >= 4x req/s and p99 <= 1/3; 1 connection p50 <= baseline's; "
          f"no errors, no wrong answers): {'met' if met else 'NOT met'}")
    failed = [(run, server, kind, c, r) for run, server, kind, c, r in cells if cell_failed(r, args.workers)]
    checked, wrong = sum(c[4]["checked"] for c in cells), sum(c[4]["wrong"] for c in cells)
    for run, server, kind, c, r in failed:
        print(f"FAIL run {run} {server} {kind} c={c}: {r['wrong']} of {r['checked']} answers wrong during the load"
              f"{' (first: ' + r['first_wrong'] + ')' if r['first_wrong'] else ''}, {r['processes']} serving "
              f"processes (asked {args.workers})")
    print(f"answers checked during the load: {checked}, wrong: {wrong}; "
          f"{f'FAIL in {len(failed)} cell(s)' if failed else 'every cell passed'}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
