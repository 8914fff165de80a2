"""serve.capture: a sample of live requests written as a data set fetch can read back, and their feedback labels.

The folder (serve.capture_dir) holds JSONL files, one JSON object per line (THE CONTRACT the capture data source
of the pipeline reads):

    capture-<UTC time>-<pid>.jsonl   {"id": uuid4 hex, "time": ISO-8601 UTC, "model", "version",
                                      "modality": image | audio | text, "input", "shape", "class", "probability"}
    feedback-<UTC time>-<pid>.jsonl  {"id", "label"}   (POST /v2/feedback)

`input` is what the model received: an image row as nested lists of float32 pixels [C, H, W] (raw, 0..255), an
audio row as its float samples (fitted to the model's length), a text as the string sent. Each captured row has its
own id; the caller gets the ids of its request's rows in the `x-tuneline-request-id` header (comma-separated, in row
order) to send labels for later.

Writes never block the event loop: rows are buffered and written by a thread every FLUSH_S (or on stop), a
whole number of lines per write. A reader must still skip a truncated last line (a crash mid-write, or a file
being written). A file is closed at serve.capture_max_mb / 10 and the oldest files are deleted while the folder
holds more than serve.capture_max_mb. Every worker of serve.workers > 1 writes files of its own (its pid in the
name).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from tuneline.serving.background import cancel_and_wait

log = logging.getLogger("tuneline.serving.capture")

FLUSH_S = 0.5  # how often buffered lines are written
KNOWN_IDS = 100_000  # captured ids this process remembers (feedback on them counts in /v2/live's labelled numbers)


def _stamp(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%S.%fZ")


class _Stream:
    """One kind of file (capture or feedback): the open file, rotated at a size."""

    def __init__(self, folder: Path, prefix: str, rotate_bytes: int):
        self.folder, self.prefix, self.rotate_bytes = folder, prefix, rotate_bytes
        self.path: Path | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.path is None or self.size >= self.rotate_bytes:
            self.path = self.folder / f"{self.prefix}-{_stamp(datetime.now(UTC))}-{os.getpid()}.jsonl"
            self.size = 0
        with open(self.path, "ab") as handle:  # one write of whole lines
            handle.write(data)
        self.size += len(data)


class Capture:
    """The capture of one server process (off unless serve.capture)."""

    def __init__(self, folder: Path, percent: float, max_mb: float):
        self.folder, self.percent = Path(folder), percent
        self.max_bytes = int(max_mb * 1e6)
        rotate = max(1, self.max_bytes // 10)
        self.streams = {"capture": _Stream(self.folder, "capture", rotate),
                        "feedback": _Stream(self.folder, "feedback", rotate)}
        self._pending: dict[str, list] = {"capture": [], "feedback": []}
        self._lock = threading.Lock()  # the writer thread is one at a time; this guards the files and the cap
        self.known: OrderedDict[str, tuple[str, str, int]] = OrderedDict()  # id -> (model, version, class)
        self._task: asyncio.Task | None = None
        self.written = 0

    def sampled(self) -> bool:
        return self.percent > 0 and random.random() * 100 < self.percent

    def record(self, model, rows: np.ndarray, texts: list[str] | None, probabilities: np.ndarray) -> list[str]:
        """Queue the rows of one request (a LoadedModel's); returns their ids. Serialisation happens in the writer."""
        ids = [uuid.uuid4().hex for _ in range(len(rows))]
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        best = probabilities.argmax(axis=1)
        for index, row_id in enumerate(ids):
            cls = int(best[index])
            self.known[row_id] = (model.name, model.version, cls)
            self._pending["capture"].append((row_id, now, model.name, model.version, model.modality,
                                             texts[index] if texts is not None else rows[index], cls,
                                             float(probabilities[index, cls])))
        while len(self.known) > KNOWN_IDS:
            self.known.popitem(last=False)
        return ids

    def feedback(self, row_id: str, label: int) -> tuple[str, str, int] | None:
        """Queue a label for a captured row; returns (model, version, class) when this process captured it."""
        self._pending["feedback"].append({"id": row_id, "label": label})
        return self.known.get(row_id)

    # ----- writing ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_every())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self.flush()

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - a full disk must not stop the server; the log says why
                log.exception("capture write failed", extra={"event": "capture_error", "folder": str(self.folder)})

    async def flush(self) -> None:
        """Write what is buffered (in a thread)."""
        pending, self._pending = self._pending, {"capture": [], "feedback": []}
        if pending["capture"] or pending["feedback"]:
            await asyncio.to_thread(self._write, pending)

    def _write(self, pending: dict[str, list]) -> None:
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            if pending["capture"]:
                self.streams["capture"].write(b"".join(_capture_line(*row) for row in pending["capture"]))
                self.written += len(pending["capture"])
            if pending["feedback"]:
                self.streams["feedback"].write(b"".join(orjson.dumps(f) + b"\n" for f in pending["feedback"]))
            self._enforce_cap()

    def _enforce_cap(self) -> None:
        """Delete the oldest files (by the time in their names) while the folder holds more than the cap."""
        files = []
        for path in self.folder.glob("*.jsonl"):
            try:
                files.append((path.name.split("-", 1)[1], path, path.stat().st_size))
            except (IndexError, OSError):
                continue
        total = sum(size for _, _, size in files)
        mine = {s.path for s in self.streams.values()}
        for _, path, size in sorted(files):
            if total <= self.max_bytes:
                break
            if path in mine:
                continue
            path.unlink(missing_ok=True)
            total -= size


def _capture_line(row_id, time, model, version, modality, value, cls, probability) -> bytes:
    if isinstance(value, np.ndarray):
        shape, value = list(value.shape), value.astype(np.float32, copy=False)
    else:
        shape = []  # a text: the string itself
    return orjson.dumps({"id": row_id, "time": time, "model": model, "version": version, "modality": modality,
                         "input": value, "shape": shape, "class": cls, "probability": probability},
                        option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
