"""serve.challenger: which version answers a request (canary), and the challenger's shadow runs.

Canary: serve.canary_percent of requests are answered by the challenger. A request carrying a client key (header
`x-tuneline-client`, the same key as gRPC metadata) is placed by a hash of the key, so the same key always gets the
same version, in every worker of the server and across restarts; a request without one is placed at random.

Shadow: the champion answers; then serve.shadow_percent of requests are queued for the challenger, off the
response path. A bounded queue (serve.shadow_queue) holds them; when it is full the request is dropped and counted,
so a slow challenger never holds up the caller or grows memory. A thread of its own takes whatever is queued and
runs it on the challenger's session together (one run); the event loop then compares each row's class with the
champion's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


log = logging.getLogger("tuneline.serving.challenger")

CLIENT_KEY = "x-tuneline-client"  # REST header and gRPC metadata key
VERSION_HEADER = "x-tuneline-version"  # which version answered (REST header, gRPC trailing metadata)
REQUEST_ID_HEADER = "x-tuneline-request-id"  # captured rows' ids (serving/capture.py)
HASH_POINTS = 10_000  # a key's place in [0, 100) percent, in steps of 0.01
GATHER_S = 0.05  # the shadow thread waits this long after a wake-up, so the requests of that moment share one run:
                 # each session run has a fixed cost (its thread pool's wake-ups), which runs of one or two rows
                 # paid again and again (5 ms cost the caller 2-3x what 50 ms does, bench/bench_shadow.py)


def key_point(key: str) -> float:
    """Where `key` falls in [0, 100): a stable hash (the same in every process, unlike hash())."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % HASH_POINTS * (100 / HASH_POINTS)


def routes_to_challenger(percent: float, key: str | None, draw: Callable[[], float] = random.random) -> bool:
    """Whether a request goes to the challenger at canary `percent`: by its key's hash, else at random."""
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    if key:
        return key_point(key) < percent
    return draw() * 100 < percent


@dataclass
class _Job:
    model: object  # the challenger's LoadedModel
    rows: np.ndarray
    champion_classes: np.ndarray


@dataclass
class _Result:
    job: _Job
    outputs: dict[str, np.ndarray] | None  # LoadedModel.run's outputs for the job's rows; None: the run failed
    seconds: float


class Shadow:
    """The shadow queue and its consumer thread (one per server process).

    Why a thread of its own, not a task on the event loop: under load the event loop's CPU is the server's
    bottleneck, and a shadow job going through the challenger's batcher cost it a future, a task, an executor hop
    and a wake-up per job (bench/bench_shadow.py measured +3-26 % on p50 at 64 connections). Here the loop pays a
    deque append per sampled request and one callback per batch of results; the thread batches whatever waited,
    runs the challenger's session itself (ONNX Runtime sessions, and BoundRunner, are thread-safe), and hands the
    results back to the loop, which keeps every live number single-threaded.

    It runs at the process's normal CPU priority on purpose: a niced thread that waits for the GIL makes the event
    loop wait too (CPython's forced GIL hand-over waits until the waiting thread is scheduled), and nice 10 measured
    worse for the caller than nice 0 (p50 +13-24 % against -1 to +2 %).
    """

    def __init__(self, size: int, percent: float, on_result: Callable, on_drop: Callable,
                 max_batch_rows: int = 256):
        """`on_result(model, job_rows, outputs | None, seconds, champion_classes)` after each shadow run, on the event
        loop (outputs: the job's rows' slice of LoadedModel.run's; None: it failed); `on_drop(model)` for each request
        dropped because the queue was full."""
        self.percent, self.size, self.max_batch_rows = percent, size, max_batch_rows
        self.on_result, self.on_drop = on_result, on_drop
        self._jobs: deque[_Job] = deque()  # append (loop) and popleft (thread) are atomic: no lock needed
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def sampled(self) -> bool:
        return self.percent > 0 and random.random() * 100 < self.percent

    def offer(self, challenger, rows: np.ndarray, champion_classes: np.ndarray) -> bool:
        """Queue one answered request for the challenger; False (counted) when the queue is full. Never waits."""
        if len(self._jobs) >= self.size:
            self.on_drop(challenger)
            return False
        self._jobs.append(_Job(challenger, rows, champion_classes))
        if not self._wake.is_set():
            self._wake.set()
        return True

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._consume, name="tuneline-shadow", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """End the thread after its current batch (what is still queued is not run: the server is stopping)."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ----- the consumer thread ----------------------------------------------------------------------------
    def _consume(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping:
                return
            self._wake.clear()  # before taking: a job offered from here on sets it again
            time.sleep(GATHER_S)  # let the requests of the same moment join one run
            while self._jobs and not self._stopping:
                results = self._run(self._take())
                try:
                    self._loop.call_soon_threadsafe(self._deliver, results)
                except RuntimeError:  # the loop closed under us: the server is gone
                    return

    def _take(self) -> list[_Job]:
        """Jobs of one challenger version, up to max_batch_rows rows (at least one job)."""
        first = self._jobs.popleft()
        jobs, rows = [first], len(first.rows)
        while self._jobs and self._jobs[0].model is first.model and rows + len(self._jobs[0].rows) <= self.max_batch_rows:
            job = self._jobs.popleft()
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    def _run(self, jobs: list[_Job]) -> list[_Result]:
        model = jobs[0].model
        started = time.perf_counter()
        try:
            rows = jobs[0].rows if len(jobs) == 1 else np.concatenate([job.rows for job in jobs])
            outputs = model.run(rows)
        except Exception:  # noqa: BLE001 - a failing challenger is counted as an error, never the caller's problem
            log.warning("shadow run failed", exc_info=True, extra={"event": "shadow_error", "model": model.name,
                                                                   "version": model.version})
            seconds = time.perf_counter() - started
            return [_Result(job, None, seconds) for job in jobs]
        seconds = time.perf_counter() - started
        results, offset = [], 0
        for job in jobs:
            end = offset + len(job.rows)
            results.append(_Result(job, {name: value[offset:end] for name, value in outputs.items()}, seconds))
            offset = end
        return results

    def _deliver(self, results: list[_Result]) -> None:
        """On the event loop: the live numbers of one batch."""
        for result in results:
            job = result.job
            self.on_result(job.model, job.rows, result.outputs, result.seconds, job.champion_classes)

