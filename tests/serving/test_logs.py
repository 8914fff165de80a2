"""The server's logs are written by a thread of their own (serving/logs.py): a log stream that does not take
writes (a full pipe nobody reads, a disk the kernel is holding writes back on) never stalls the code that logs,
which in the server is the event loop answering every request."""

import json
import logging
import os
import threading
import time

import pytest

from tuneline.serving.logs import configure_logging, stop_logging

pytestmark = pytest.mark.fast


def test_logging_returns_at_once_while_the_stream_blocks_and_every_line_arrives_whole_later():
    read_end, write_end = os.pipe()  # a pipe holds 64 KiB; nobody reads it until the end
    stream = os.fdopen(write_end, "w", buffering=1)
    log = logging.getLogger("tuneline.serving.access")
    lines, padding = 2000, "x" * 200  # ~0.5 MB of JSON lines: eight times what the pipe holds
    done = threading.Event()

    def log_lines():
        for i in range(lines):
            log.info("request", extra={"event": "request", "i": i, "padding": padding})
        done.set()

    configure_logging("info", stream=stream)
    try:
        started = time.perf_counter()
        threading.Thread(target=log_lines, daemon=True).start()
        # Written on the caller's thread, the 300th line or so would block until someone reads the pipe.
        assert done.wait(10), "logging blocked on a stream that does not take writes"
        assert time.perf_counter() - started < 5
        received = bytearray()
        reader = threading.Thread(target=lambda: received.extend(_read_all(read_end)), daemon=True)
        reader.start()
        stop_logging()  # writes what is queued
        stream.close()
        reader.join(10)
    finally:
        stop_logging()
        logging.getLogger().handlers[:] = []
    entries = [json.loads(line) for line in received.decode().splitlines()]
    assert [e["i"] for e in entries] == list(range(lines))  # whole, in order, none lost
    assert entries[0]["logger"] == "tuneline.serving.access" and entries[0]["padding"] == padding


def test_an_exception_logged_is_written_with_its_traceback():
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", buffering=1)
    configure_logging("info", stream=stream)
    try:
        try:
            raise ValueError("bad row")
        except ValueError:
            logging.getLogger("tuneline.serving.app").exception("unhandled error", extra={"event": "internal_error"})
        stop_logging()
        stream.close()
        entry = json.loads(_read_all(read_end).decode().splitlines()[0])
    finally:
        stop_logging()
        logging.getLogger().handlers[:] = []
    assert entry["event"] == "internal_error" and "ValueError: bad row" in entry["exception"]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_the_log_writer_follows_sys_stderr_when_it_is_replaced(monkeypatch):
    # A test runner swaps sys.stderr per test and closes the old one; a server configured earlier in the process
    # must write to the current one, not fail on the closed one ("--- Logging error --- I/O on closed file").
    import io
    import sys

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    try:
        configure_logging("info")
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        first.close()
        logging.getLogger("tuneline.serving.test").info("after the swap")
        stop_logging()
        written = second.getvalue()
        assert '"msg": "after the swap"' in written and "Logging error" not in written, written
    finally:
        stop_logging()
        root.handlers[:] = handlers
        root.setLevel(level)


class _CountingStream:
    """A text stream that keeps what it is given and counts the write() calls."""

    def __init__(self) -> None:
        self.text, self.writes = "", 0

    def write(self, text: str) -> int:
        self.text += text
        self.writes += 1
        return len(text)

    def flush(self) -> None:
        pass


def test_lines_are_written_in_batches_and_a_lone_line_at_once():
    stream, log = _CountingStream(), logging.getLogger("tuneline.serving.access")
    configure_logging("info", stream=stream)
    try:
        log.info("request", extra={"event": "request", "i": -1})
        deadline = time.monotonic() + 2
        while not stream.text and time.monotonic() < deadline:  # the writer waits for the first line: no delay
            time.sleep(0.001)
        assert stream.writes == 1 and json.loads(stream.text)["i"] == -1
        for i in range(5000):  # faster than the writer's pace: one write() per batch, not per line
            log.info("request", extra={"event": "request", "i": i})
        stop_logging()
    finally:
        stop_logging()
        logging.getLogger().handlers[:] = []
    entries = [json.loads(line) for line in stream.text.splitlines()]
    assert [e["i"] for e in entries] == list(range(-1, 5000))
    assert stream.writes <= 5001 / 20, f"{stream.writes} writes for 5001 lines"
