"""Dynamic batching: concurrent requests become one session run; each caller gets back exactly its rows.

A batch is dispatched when it holds `max_batch_size` rows, when its oldest request has waited
`max_delay_s`, or early: when every inference request in flight at the server is already queued here and
there are at least as many as a batch usually holds. Nobody else can join then, so waiting would only add
latency. The "usually holds" part matters under load: requests still unread in socket buffers are not yet
"in flight", and without it a busy server would fire many small batches. A lone request (the only one in
flight at the server) always goes at once, whatever the last burst taught "usually holds": concurrency 1
runs at batch-1 speed, never held for the window (tests/serving/test_latency.py), and on the event loop
itself when its last run took under INLINE_RUN_S and the traffic is one client's (one_client). While one batch runs in the worker thread, the next one fills up. The drain task exists
only while requests are queued, so a swapped-out model version needs no shutdown: its last batches finish.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

Outputs = dict[str, np.ndarray]
INLINE_RUN_S = 0.0005  # a lone request whose run took less than this runs on the event loop: the hop to the
                       # worker thread and back (two wake-ups, each a scheduler delay on busy cores) costs more


@dataclass
class _Item:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], Outputs], executor: Executor, max_batch_size: int = 64,
                 max_delay_s: float = 0.002, enabled: bool = True, in_flight: Callable[[], int] | None = None,
                 on_batch: Callable[[int, list[float], float], None] | None = None,
                 one_client: Callable[[], bool] | None = None):
        """`run` maps a [rows, ...] array to outputs whose first axis is rows; it runs on `executor`.

        `in_flight` reports how many inference requests the server is handling; `one_client` whether the traffic
        is one client's (middleware.InFlight.one_client; None: never, so nothing runs on the loop); `on_batch(rows,
        queue waits in s, run time in s)` is called after each run (metrics).
        """
        self.run, self.executor = run, executor
        self.max_batch_size, self.max_delay_s, self.enabled = max_batch_size, max_delay_s, enabled
        self.in_flight, self.on_batch, self.one_client = in_flight, on_batch, one_client
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        self._typical = 1.0  # moving average of requests per batch
        self._lone_run_s = float("inf")  # how long the last lone request's run took; unknown at first
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._flushing = False  # set when the server drains: nobody new will join, so no batch waits

    def flush(self) -> None:
        """Dispatch what is queued now, and from now on never wait for a batch to fill (the server is draining)."""
        self._flushing = True
        self._wake.set()

    async def submit(self, rows: np.ndarray) -> Outputs:
        """Run `rows` (first axis = rows) as part of a batch; returns this caller's slice of every output."""
        loop = asyncio.get_running_loop()
        item = _Item(rows, loop.create_future())
        if not self.enabled:
            await self._execute([item])
            return item.future.result()
        if (self._worker is None and self._lone_run_s < INLINE_RUN_S and self.in_flight and self.in_flight() <= 1
                and self.one_client is not None and self.one_client()):
            self._run_inline(item)
            return item.future.result()
        self._pending.append(item)
        self._pending_rows += len(rows)
        if self._dispatch_now():
            self._wake.set()
        if self._worker is None:
            self._worker = loop.create_task(self._drain())
        return await item.future

    @property
    def queued(self) -> int:
        return len(self._pending)

    def _dispatch_now(self) -> bool:
        if self._flushing or self._pending_rows >= self.max_batch_size:
            return True
        if self.in_flight is None:
            return False
        queued, in_flight = len(self._pending), self.in_flight()
        if queued == 1 and in_flight <= 1:
            return True  # the only request at the server: nothing to wait for, whatever the last burst was
        return queued >= in_flight and queued >= int(self._typical)

    async def _drain(self) -> None:
        try:
            while self._pending:
                wait = self._pending[0].enqueued + self.max_delay_s - time.perf_counter()
                if wait > 0 and not self._dispatch_now():
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except TimeoutError:
                        pass
                await self._execute(self._take())
        finally:
            # No await between the emptiness check and here, so no submit can be stranded without a worker.
            self._worker = None

    def _take(self) -> list[_Item]:
        batch = [self._pending.popleft()]  # always at least one, even if it alone exceeds max_batch_size
        rows = len(batch[0].rows)
        while self._pending and rows + len(self._pending[0].rows) <= self.max_batch_size:
            item = self._pending.popleft()
            rows += len(item.rows)
            batch.append(item)
        self._pending_rows -= rows
        self._typical = 0.8 * self._typical + 0.2 * len(batch)  # adapts within a few batches
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, rows)
        except Exception as exc:  # noqa: BLE001 - every caller of this batch learns of the failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self._deliver(batch, outputs, started, time.perf_counter())

    def _run_inline(self, item: _Item) -> None:
        """The lone request's run on the event loop thread (only when it is known to take < INLINE_RUN_S)."""
        started = time.perf_counter()
        try:
            outputs = self.run(item.rows)
        except Exception as exc:  # noqa: BLE001 - the caller learns of the failure
            self._lone_run_s = float("inf")  # next time, off the loop
            item.future.set_exception(exc)
            return
        self._deliver([item], outputs, started, time.perf_counter())

    def _deliver(self, batch: list[_Item], outputs: Outputs, started: float, finished: float) -> None:
        rows = sum(len(item.rows) for item in batch)
        if len(batch) == 1:
            self._lone_run_s = finished - started
        offset = 0
        for item in batch:
            n = len(item.rows)
            if not item.future.done():  # a cancelled caller (client gone) just drops its rows
                item.future.set_result({name: value[offset:offset + n] for name, value in outputs.items()})
            offset += n
        if self.on_batch is not None:
            self.on_batch(rows, [started - item.enqueued for item in batch], finished - started)
