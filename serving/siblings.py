"""serve.workers > 1: repository load and unload applied by every worker, not only the one a connection reached.

The worker that receives POST /v2/repository/models/{name}/load|unload applies it itself first, as one process
does: its refusals (unknown model or version, unloading the champion, a version that does not load) answer the
client as they always did, and no other worker is asked. Then it asks each other worker to apply the same, all at
once, and answers only when every one has: 200 once all applied it; else 500 naming each worker that did not and
why (the workers now differ: retry the request; load and unload are idempotent). An unload that finds the version
not loaded in a worker counts as applied there: it is not loaded, which is what was asked.

The channel: each worker listens on a Unix socket, `worker-<index>.sock` in the folder its parent made for the
server (serving/workers.py: mode 0700, removed when the server stops), and a request is one JSON line each way:
{"op": "load" | "unload", "name", "version"} -> {"pid", "status", "error"}. Why this, rather than...
- serve.port: the kernel picks the worker per connection, so no request can be aimed at a given worker there;
- a loopback TCP port per worker with a shared secret: ports to reserve and a secret to pass and check, for the
  same boundary the folder's permissions already draw (only the server's user can open the sockets, as only
  that user could read a secret from the workers' environment);
- a file the workers poll (as the champion alias is): the answer would come a poll later, or before the others
  acted, unless each wrote an acknowledgement back; here the client's answer is the outcome.
The same channel answers {"op": "live"} with the worker's live numbers and drift window (serving/live.py), which
GET /v2/live and the drift gauge merge into the server's: {"pid", "status", "error", "result"}.
A worker not listening yet (still starting: it listens once its app has started, and its models load after)
or no longer (stopped) counts as not applied. Forwarded calls reach the data plane directly: one client request
is one request in /metrics, however many workers apply it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.serving.errors import BadRequest, ServingError

if TYPE_CHECKING:
    from tuneline.serving.dataplane import DataPlane

log = logging.getLogger("tuneline.serving.siblings")

CONNECT_TIMEOUT_S = 5.0
APPLY_TIMEOUT_S = 600.0  # a load verifies, opens and warms a session (a TensorRT engine build can take minutes)
MAX_LINE = 64 * 1024 * 1024  # a live answer carries every model's drift window (serve.drift_window rows each)
OPS = ("load", "unload", "live")
LIVE_TIMEOUT_S = 5.0  # a worker that does not answer a live request within this is left out of the numbers


def socket_path(folder: Path, index: int) -> Path:
    """Where worker `index` of the server whose folder is `folder` listens for its siblings."""
    return Path(folder) / f"worker-{index}.sock"


class NotAppliedEverywhere(ServingError):
    """This worker applied a load/unload that another did not: the workers differ until it is retried."""

    status = 500


@dataclass(frozen=True)
class Answer:
    worker: int
    pid: int | None  # None: it did not answer
    status: int
    error: str | None
    result: object = None  # a read-only op's answer (live)

    def applied(self, op: str) -> bool:
        return self.status == 200 or (op == "unload" and self.status == 404)  # 404: not loaded there either


class Siblings:
    """This worker's end of the channel: listens for the others' requests, and sends its own to them."""

    def __init__(self, folder: Path, index: int, count: int):
        self.folder, self.index, self.count = Path(folder), index, count
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, dataplane: DataPlane) -> None:
        """Apply what the other workers send, from now on (call it in the server's event loop)."""
        path = socket_path(self.folder, self.index)
        self._server = await asyncio.start_unix_server(functools.partial(_serve_one, dataplane), path=str(path),
                                                       limit=MAX_LINE)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def apply(self, op: str, name: str, version: str | None) -> list[Answer]:
        """Have every other worker apply `op` (this one already did): their answers; NotAppliedEverywhere names
        those that did not apply it."""
        request = json.dumps({"op": op, "name": name, "version": version}).encode() + b"\n"
        others = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(*(self._ask(i, request) for i in others))
        failed = [a for a in answers if not a.applied(op)]
        what = f"{op} of {name} {version or 'champion alias'}"
        if not failed:
            log.info("applied by every worker", extra={"event": "repository_applied", "op": op, "model": name,
                                                        "version": version, "workers": self.count})
            return answers
        log.error("not applied by every worker", extra={
            "event": "repository_not_applied", "op": op, "model": name, "version": version,
            "failed": [{"worker": a.worker, "pid": a.pid, "status": a.status, "error": a.error} for a in failed]})
        reasons = "; ".join(f"worker {a.worker}{f' (pid {a.pid})' if a.pid else ''}: {a.status} {a.error}"
                            for a in failed)
        raise NotAppliedEverywhere(
            f"{what}: applied by this worker (pid {os.getpid()}) and {len(others) - len(failed)} of its "
            f"{len(others)} sibling workers, not by {reasons}. The workers now differ: retry the request, or "
            "restart the server")

    async def collect(self, op: str) -> list:
        """Every other worker's answer to a read-only `op` (live): the results of those that answered in time."""
        request = json.dumps({"op": op, "name": "", "version": None}).encode() + b"\n"
        others = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(*(self._ask(i, request, LIVE_TIMEOUT_S) for i in others))
        missing = [a.worker for a in answers if a.status != 200]
        if missing:
            log.warning("workers left out", extra={"event": "siblings_missing", "op": op, "workers": missing})
        return [a.result for a in answers if a.status == 200 and a.result is not None]

    async def _ask(self, index: int, request: bytes, timeout_s: float = APPLY_TIMEOUT_S) -> Answer:
        path = socket_path(self.folder, index)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_LINE),
                                                    CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            return Answer(index, None, 503, f"not listening ({why}): still starting, or stopped")
        try:
            writer.write(request)
            line = await asyncio.wait_for(reader.readline(), timeout_s)
            reply = json.loads(line)
            return Answer(index, reply["pid"], int(reply["status"]), reply["error"], reply.get("result"))
        except TimeoutError:
            return Answer(index, None, 504, f"no answer within {timeout_s:g} s")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # it stopped mid-way, or answered nonsense
            return Answer(index, None, 502, f"no answer ({type(exc).__name__}: {exc})")
        finally:
            writer.close()


async def _serve_one(dataplane: DataPlane, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request from a sibling: apply it here, answer how it went."""
    status, error, result = 200, None, None
    try:
        try:
            request = json.loads(await reader.readline())
            if request["op"] == "live":
                result = dataplane.live_state()
            else:
                await _apply(dataplane, request["op"], request["name"], request.get("version"))
        except ServingError as exc:
            status, error = exc.status, str(exc)
        except (ValueError, KeyError, TypeError) as exc:
            status, error = 400, f"malformed request ({type(exc).__name__}: {exc})"
        except Exception as exc:  # noqa: BLE001 - a bug: logged here, reported to the worker that asked
            log.exception("sibling request crashed", extra={"event": "internal_error", "path": "siblings"})
            status, error = 500, f"internal error ({type(exc).__name__}); see the worker's log"
        writer.write(json.dumps({"pid": os.getpid(), "status": status, "error": error, "result": result}).encode()
                     + b"\n")
        await writer.drain()
    except OSError:
        pass  # the asking worker went away: nothing to tell
    finally:
        writer.close()


async def _apply(dataplane: DataPlane, op: str, name: str, version: str | None) -> None:
    if op == "load":
        await dataplane.load(name, version)
    elif op == "unload" and version is not None:
        dataplane.unload(name, version)
    else:
        raise BadRequest(f"unknown request {op!r} (version {version!r}): expected one of {', '.join(OPS)}")
