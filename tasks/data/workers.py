"""Fetch's worker processes: chunks of images mapped over a process pool, results in chunk order, bounded.

At most IN_FLIGHT_PER_WORKER chunks per worker are submitted and not yet consumed, so however large the
source, memory holds a few chunks (their names or bytes), never the set. A small set (IN_PROCESS_MAX
images or fewer) is decoded in this process: starting workers costs more than it saves there (each
imports numpy and PIL, ~0.3 s). Workers are spawned, not forked: a fork would copy whatever the calling
process holds (a CLI that imported torch, fsspec's I/O thread), and RSS would count it once per worker.
A spawned worker would also re-run the caller's `__main__` (a script without an `if __name__ ==
"__main__"` guard would then fail, and a heavy one cost every worker its imports): it is hidden while
workers start, so they import this package's modules only.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

IN_PROCESS_MAX = 2000     # images per pass decoded without worker processes
CHUNK_IMAGES = 256        # images per task: large enough to amortise a task's overhead (~1 ms)
CHUNK_BYTES = 16 << 20    # bytes of archive members per task: bounds memory when the images are large
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: workers never wait for the main process

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def _main_hidden():
    """An empty `__main__` for what multiprocessing's spawn reads while it starts a process (the main module to
    re-import); the caller's module is back once the worker has started."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class Workers:
    """A pool of `processes` workers, started when a pass first needs it and kept for the next pass."""

    def __init__(self, processes: int | None = None):
        self.processes = max(1, processes or cpu_count())
        self._pool: ProcessPoolExecutor | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], total: int | None = None) -> Iterator[R]:
        """fn(task) for each task, in order. `total` (images in the pass, when known) decides at once whether
        workers are worth starting; otherwise they start once the pass has passed IN_PROCESS_MAX images."""
        pending: deque[Future] = deque()
        seen = 0
        try:
            for task in tasks:
                seen += len(task.items)  # type: ignore[attr-defined]
                if self._pool is None and max(seen, total or 0) > IN_PROCESS_MAX:
                    self._start()
                if self._pool is None:
                    yield fn(task)
                    continue
                with _main_hidden():  # a submit may start a worker
                    pending.append(self._pool.submit(fn, task))
                if len(pending) >= self.processes * IN_FLIGHT_PER_WORKER:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # a failed pass: what is queued never runs
                future.cancel()

    def _start(self) -> None:
        self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))

    def close(self) -> None:
        """Stop the workers, waiting for running tasks: none may write into staging once it is gone."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
