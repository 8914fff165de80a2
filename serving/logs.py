"""Structured logs: one JSON object per line, with the fields passed as `extra=` kept as keys.

Set up by `tuneline serve` only (nothing is configured at import time). Records are formatted and written by a
thread of their own: the event loop only puts each record on a queue. Written on the loop, every access-log line
was a write() the loop waited for, and when the kernel held writes back (many MB of log after seconds of traffic,
or a stderr pipe nobody was reading) every request in flight waited with it.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
MAX_QUEUED = 100_000  # records waiting for the writer; beyond it new ones are dropped (and counted), not held


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_text or record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _Enqueue(logging.handlers.QueueHandler):
    """Puts the record itself on the queue: formatting happens in the writer thread too (QueueHandler's own
    prepare() would format here, on the caller's thread). A full queue drops the record and counts it."""

    dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info and not record.exc_text:  # the traceback is rendered while its frames still exist
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            type(self).dropped += 1


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever `sys.stderr` is when it writes, not the object it was when the logging
    was set up: a process that replaces sys.stderr later (a test runner capturing output per test, a daemon
    redirecting it) must not meet a closed file ("I/O operation on closed file")."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it: sys.stderr is the stream
        pass


class _BatchWriter(logging.handlers.QueueListener):
    """The writer thread: takes every record waiting at once and writes them with one write() and one flush, then
    lets records gather for WRITE_EVERY_S. Writing and flushing each line on its own, and waking this thread for
    each, took 30 % of a one-process server's requests/s at 64 connections with the access log on
    (docs/benchmarks.md, inference server). A lone record is still written at once (the thread waits for it)."""

    WRITE_EVERY_S = 0.01
    MAX_BATCH = 2048

    def _monitor(self) -> None:
        records = self.queue
        while True:
            batch = [records.get()]  # blocks until there is something to write
            while len(batch) < self.MAX_BATCH:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            stopping = self._sentinel in batch
            self._write([record for record in batch if record is not self._sentinel])
            if stopping:
                return
            time.sleep(self.WRITE_EVERY_S)  # meanwhile a put() wakes nobody: no thread waits on the queue

    def _write(self, batch: list[logging.LogRecord]) -> None:
        handler = self.handlers[0]
        lines = []
        for record in batch:
            try:
                lines.append(handler.format(record))
            except Exception:  # noqa: BLE001 - as logging does: report the record, keep the others
                handler.handleError(record)
        if not lines:
            return
        try:
            stream = handler.stream
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or full stream: logging's own report, once per batch
            handler.handleError(batch[-1])


_listener: logging.handlers.QueueListener | None = None
_writer: logging.Handler | None = None  # the stream handler the listener writes with


def configure_logging(level: str = "info", stream=None) -> None:
    """Send the server's and uvicorn's logs to `stream` (stderr) as JSON lines, written by a background thread."""
    global _listener, _writer
    stop_logging()
    handler = _writer = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(JsonFormatter())
    records: queue.Queue = queue.Queue(MAX_QUEUED)
    _listener = _BatchWriter(records, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the middleware writes the access log, with more fields


def stop_logging() -> None:
    """Write what is queued, stop the writer thread, and write any later record at once on the caller's thread.

    The server calls it when it has stopped serving (serving/app.py): a process that ends by re-raising SIGTERM,
    or a worker process ending with os._exit, runs no atexit hook, and its last lines would be lost."""
    global _listener
    if _listener is not None:
        listener, _listener = _listener, None
        listener.stop()
        root = logging.getLogger()
        if _writer is not None and any(isinstance(h, _Enqueue) for h in root.handlers):
            root.handlers[:] = [_writer]


atexit.register(stop_logging)
