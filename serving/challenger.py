"""serve.challenger: which version answers a request (canary), and the challenger's shadow runs.

Canary: serve.canary_percent of requests are answered by the challenger. A request carrying a client key (header
`x-tuneline-client`, the same key as gRPC metadata) is placed by a hash of the key, so the same key always gets the
same version, in every worker of the server and across restarts; a request without one is placed at random.

Shadow: the champion answers; then serve.shadow_percent of requests are queued for the challenger, off the
response path. A bounded queue (serve.shadow_queue) holds them; when it is full the request is dropped and counted,
so a slow challenger never holds up the caller or grows memory. The consumer takes whatever is queued at once and
submits it to the challenger's batcher together (one session run), then compares each row's class with the
champion's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tuneline.serving.background import cancel_and_wait

log = logging.getLogger("tuneline.serving.challenger")

CLIENT_KEY = "x-tuneline-client"  # REST header and gRPC metadata key
VERSION_HEADER = "x-tuneline-version"  # which version answered (REST header, gRPC trailing metadata)
REQUEST_ID_HEADER = "x-tuneline-request-id"  # captured rows' ids (serving/capture.py)
HASH_POINTS = 10_000  # a key's place in [0, 100) percent, in steps of 0.01


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


class Shadow:
    """The shadow queue and its consumer (one per server process)."""

    def __init__(self, size: int, percent: float, on_result: Callable, on_drop: Callable):
        """`on_result(model, job_rows, probabilities | None, seconds, champion_classes)` after each shadow run (None:
        it failed); `on_drop(model)` for each request dropped because the queue was full."""
        self.percent = percent
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=size)
        self.on_result, self.on_drop = on_result, on_drop
        self._task: asyncio.Task | None = None

    def sampled(self) -> bool:
        return self.percent > 0 and random.random() * 100 < self.percent

    def offer(self, challenger, rows: np.ndarray, champion_classes: np.ndarray) -> bool:
        """Queue one answered request for the challenger; False (counted) when the queue is full. Never waits."""
        try:
            self.queue.put_nowait(_Job(challenger, rows, champion_classes))
            return True
        except asyncio.QueueFull:
            self.on_drop(challenger)
            return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._consume())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _consume(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            while not self.queue.empty():  # everything waiting joins one batch of the challenger
                jobs.append(self.queue.get_nowait())
            await asyncio.gather(*(self._run(job) for job in jobs))

    async def _run(self, job: _Job) -> None:
        started = time.perf_counter()
        try:
            results = await job.model.batcher.submit(job.rows)
        except Exception:  # noqa: BLE001 - a failing challenger is counted as an error, never the caller's problem
            log.warning("shadow run failed", exc_info=True, extra={"event": "shadow_error", "model": job.model.name,
                                                                   "version": job.model.version})
            self.on_result(job.model, job.rows, None, time.perf_counter() - started, job.champion_classes)
            return
        self.on_result(job.model, job.rows, results["probabilities"], time.perf_counter() - started,
                       job.champion_classes)
