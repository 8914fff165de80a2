"""serve.workers > 1: N server processes on one host:port, the kernel spreading connections over them.

One event loop parses and answers every request of a server, and at 64 JSON clients that loop is the limit
(about 0.5 ms of CPU per request, on one core; docs/benchmarks.md). Each worker is a whole server as with
serve.workers=1 (its event loop, model holder, batcher, ONNX Runtime session with serve.threads), started as a
fresh `tuneline serve` process (never a fork: ONNX Runtime and gRPC do not survive one) that binds its own
listening socket with SO_REUSEPORT; the kernel hands each new connection to one of them. With serve.grpc_port
set, the same goes for gRPC: each worker's grpc.aio server binds the gRPC port with SO_REUSEPORT, so each new
gRPC connection (channel) reaches one worker.

The parent process only reserves the ports, starts, watches and stops them: SIGTERM/SIGINT is passed on as
SIGTERM (each worker goes unready, then drains, as serving/drain.py says; a second signal is passed on too, and
skips the rest of each worker's drain delay), and a worker that exits on its own stops the others and makes the
parent exit non-zero.

Several processes still answer as one server where a client would notice. The parent makes a private folder for
the server (mode 0700, TUNELINE_WORKERS_DIR; removed when it exits) and its workers share it:
- metrics/ is every worker's PROMETHEUS_MULTIPROC_DIR: a scrape of /metrics on any worker reports the server's
  totals (serving/metrics.py); the parent clears a stopped worker's live gauges (mark_process_dead);
- worker-<index>.sock: the channel over which a repository load/unload that reached one worker is applied by
  all before it is answered (serving/siblings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuneline.serving.drain import DrainingServer
from tuneline.serving.settings import WORKERS_DIR_ENV, ServeSettings
from tuneline.serving.siblings import Siblings, socket_path
from tuneline.core.config.base import ConfigError

log = logging.getLogger("tuneline.serving.workers")

WORKER_HEADER = "X-Tuneline-Worker"  # the pid of the worker that answered (only when serve.workers > 1)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.1
KILL_GRACE_S = 5.0  # beyond serve.shutdown_timeout_s, how long a told-to-stop worker may take before SIGKILL
JOIN_POLL_S = 0.1  # how often a loading worker checks whether it may join the port
_PR_SET_PDEATHSIG = 1
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's: where each process writes its metric values
METRICS_DIR = "metrics"  # in the server's folder
UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (Linux: 108 with the terminating NUL)


def _address(host: str, port: int) -> tuple[int, tuple]:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, address


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT (not yet listening: the caller decides)."""
    family, address = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _reserve_port(host: str, port: int, setting: str = "serve.port") -> socket.socket:
    """Hold `setting`'s port for the workers (0: pick a free one), refusing one that another server already listens on.

    The check binds without SO_REUSEPORT: SO_REUSEPORT alone would let the workers silently join another
    server of the same user on that port. The reservation stays bound but never listens, so the kernel gives
    it no connections; it only keeps the port from being taken between the check and the workers' binds.
    """
    family, address = _address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"{setting} {port} on {host}: cannot listen ({exc.strerror}): pick another port, "
                              "or 0 for any free one") from None
        port = probe.getsockname()[1]
        return reuseport_socket(host, port)


def worker_command(args: argparse.Namespace, root: Path, port: int, index: int,
                   grpc_port: int | None = None, workers: int | None = None) -> list[str]:
    """`tuneline serve` as the user ran it (flags and -S overrides), on the reserved ports, as worker `index` of
    `workers` (the parent's count, so `auto` cannot resolve to another in a worker)."""
    command = [sys.executable, "-m", "tuneline.flows.cli", "--project", str(root), "serve"]
    for flag in ("host", "device", "registry", "model"):
        value = getattr(args, flag, None)
        if value is not None:
            command += [f"--{flag}", str(value)]
    for override in getattr(args, "overrides", []):
        command += ["-S", override]
    if workers is not None:  # the last -S wins
        command += ["-S", f"serve.workers={workers}"]
    if grpc_port is not None:  # the concrete port (serve.grpc_port 0 picked it in the parent); flags beat -S
        command += ["--grpc-port", str(grpc_port)]
    return [*command, "--port", str(port), "--worker-index", str(index)]


def _server_folder(workers: int) -> Path:
    """A fresh private folder for the server's workers: their metrics files and sockets (see the module doc)."""
    folder = Path(tempfile.mkdtemp(prefix="tuneline-serve-"))  # mode 0700: only this user opens the sockets
    longest = socket_path(folder, workers - 1)
    if len(os.fsencode(longest)) > UNIX_PATH_MAX:
        folder.rmdir()
        raise ConfigError(f"serve.workers: the workers' socket path {longest} is longer than a Unix socket path may "
                          f"be ({UNIX_PATH_MAX} bytes): set TMPDIR to a shorter folder")
    (folder / METRICS_DIR).mkdir()
    return folder


def _mark_stopped(workers: list[subprocess.Popen], marked: set[int], metrics: Path) -> None:
    """Drop the live gauges (in flight, ready, model info) of each worker that has exited since the last call: the
    other workers' scrapes would otherwise go on counting them. Its counters and histograms stay in the totals."""
    from prometheus_client.multiprocess import mark_process_dead

    for worker in workers:
        if worker.returncode is not None and worker.pid not in marked:
            marked.add(worker.pid)
            mark_process_dead(worker.pid, str(metrics))


def run_workers(settings: ServeSettings, args: argparse.Namespace, root: Path) -> int:
    """Start serve.workers worker processes and wait for them; the exit status `tuneline serve` should have."""
    folder = _server_folder(settings.workers)
    try:
        status, stop_signals = _run_workers(settings, args, root, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for sig in reversed(stop_signals):  # as uvicorn does: end "stopped by SIGTERM", like serve.workers=1
        signal.raise_signal(sig)
    return status


def _run_workers(settings: ServeSettings, args: argparse.Namespace, root: Path,
                 folder: Path) -> tuple[int, list[int]]:
    """run_workers' work: its exit status, and the stop signals it should end by (none when a worker failed)."""
    metrics = folder / METRICS_DIR
    # Each worker's environment only: prometheus_client reads it once, when a worker imports it.
    env = {**os.environ, METRICS_ENV: str(metrics), WORKERS_DIR_ENV: str(folder)}
    marked: set[int] = set()
    reservations = [_reserve_port(settings.host, settings.port)]
    port, grpc_port = reservations[0].getsockname()[1], None
    if settings.grpc_port is not None:
        try:
            reservations.append(_reserve_port(settings.host, settings.grpc_port, "serve.grpc_port"))
        except ConfigError:
            reservations[0].close()
            raise
        grpc_port = reservations[1].getsockname()[1]
    stop_signals: list[int] = []
    workers: list[subprocess.Popen] = []

    stop_sent: list[float] = []  # when the workers were first told to stop

    def stop_all(signum: int, frame=None) -> None:
        if frame is not None and not stop_signals:  # a signal handler's first call: end by it, as a one-process
            stop_signals.append(signum)               # server does (a second signal only hurries the stop)
        stop_sent.append(time.monotonic())
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)  # SIGINT twice would make uvicorn skip the drain

    def kill_the_stuck() -> None:
        """SIGKILL workers still running well after their drain allowance: a stop must end even if a worker hangs."""
        allowance = settings.drain_delay_s + settings.shutdown_timeout_s + KILL_GRACE_S
        if stop_sent and time.monotonic() - stop_sent[0] > allowance:
            for worker in workers:
                if worker.poll() is None:
                    log.warning("worker killed", extra={"event": "worker_killed", "pid": worker.pid,
                                                        "after_s": round(time.monotonic() - stop_sent[0], 1)})
                    worker.kill()

    original = {sig: signal.signal(sig, stop_all) for sig in STOP_SIGNALS}
    failed: int | None = None
    try:
        for index in range(settings.workers):
            if stop_signals:
                break
            worker = subprocess.Popen(worker_command(args, root, port, index, grpc_port, settings.workers), env=env)
            workers.append(worker)
            log.info("worker started", extra={"event": "worker_started", "worker": index, "pid": worker.pid,
                                              "host": settings.host, "port": port, "grpc_port": grpc_port,
                                              "threads": settings.threads, "folder": str(folder)})
        while _running(workers):
            _mark_stopped(workers, marked, metrics)
            if failed is None and not stop_signals:
                died = next((w for w in workers if w.returncode is not None), None)
                if died is not None:  # a worker stopped on its own: it failed to start, or it crashed
                    failed = died.returncode
                    log.error("worker exited", extra={"event": "worker_exited", "pid": died.pid,
                                                      "returncode": died.returncode})
                    stop_all(signal.SIGTERM)
            kill_the_stuck()
            time.sleep(POLL_S)
    finally:
        stop_all(signal.SIGTERM)
        while _running(workers):
            _mark_stopped(workers, marked, metrics)
            kill_the_stuck()
            time.sleep(POLL_S)
        for reservation in reservations:
            reservation.close()
        for sig, handler in original.items():
            signal.signal(sig, handler)
    for worker in workers:
        log.info("worker stopped", extra={"event": "worker_stopped", "pid": worker.pid,
                                          "returncode": worker.returncode})
    if failed is None:
        failed = next((w.returncode for w in workers if w.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)), None)
    if failed is not None:
        return (failed if failed > 0 else 1), []
    return 0, stop_signals


def _running(workers: list[subprocess.Popen]) -> bool:
    """Whether any worker still runs, after polling every one (so each exit status is known: `any()` over a
    generator stops polling at the first live worker, and a later worker's death then went unseen)."""
    return [w.poll() for w in workers].count(None) > 0


class WorkerServer(DrainingServer):
    """A worker's server: worker 0 listens at once, as a one-process server does; any other joins serve.port (and
    serve.grpc_port) only once its own models are ready and the port answers ready (worker 0, or one that joined
    after it).

    So a connection never reaches a worker still loading while another says ready: until worker 0 is ready it
    takes every connection (and its /v2/health/ready tells the truth), and later workers join ready.
    """

    def __init__(self, config, sock: socket.socket, index: int, host: str):
        super().__init__(config)
        self.sock, self.index, self.host = sock, index, host
        self._join: asyncio.Task | None = None
        self.failed = False  # joining failed: the worker stops, and exits non-zero

    async def startup(self, sockets=None) -> None:
        if self.index == 0:
            await super().startup(sockets=[self.sock])
        else:
            await super().startup(sockets=[])  # the app's start-up (models load in the background); no listener yet
            self._join = asyncio.create_task(self._join_when_ready())
        if not self.should_exit:  # the app started: the other workers may send it repository loads/unloads now
            state = self.config.app.state
            await state.siblings.listen(state.dataplane)

    async def _join_when_ready(self) -> None:
        state = self.config.app.state
        port = self.sock.getsockname()[1]
        # Not once stopping: the others answer 503 then, and a worker that said nothing has nobody to tell.
        while not (state.holder.ready and not state.drain.announced and await _answers_ready(self.host, port)):
            await asyncio.sleep(JOIN_POLL_S)
        try:
            await state.start_grpc()  # serving/grpc_v2.py left gRPC to this (app.state.grpc_joins_later)
        except OSError:
            log.exception("worker failed to join the gRPC port", extra={"event": "worker_join_failed",
                                                                         "worker": self.index, "pid": os.getpid()})
            self.failed = self.should_exit = True
            return
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,
                                     server_state=self.server_state, app_state=self.lifespan.state)
        server = await asyncio.get_running_loop().create_server(protocol, sock=self.sock, backlog=self.config.backlog)
        self.servers.append(server)
        log.info("worker joined", extra={"event": "worker_joined", "worker": self.index, "pid": os.getpid()})

    async def shutdown(self, sockets=None) -> None:
        if self._join is not None and not self._join.done():
            self._join.cancel()
            self.sock.close()  # never listened: nothing to drain
        try:
            await super().shutdown(sockets)
        finally:
            self.config.app.state.siblings.close()  # after the drain: a load forwarded meanwhile still applies here


async def _answers_ready(host: str, port: int) -> bool:
    """Whether serve.port answers GET /v2/health/ready with 200 (the probe paths need no token)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=2.0)
    except OSError:  # TimeoutError is one
        return False
    try:
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), timeout=2.0)
        return status_line.split(b" ")[1:2] == [b"200"]
    except OSError:  # TimeoutError is one
        return False
    finally:
        writer.close()


def worker_server(app, config, settings: ServeSettings, index: int):
    """Make this process worker `index`; returns the server class to run (`server_class(config).run()`).

    Adds the worker header to the app, has /metrics report every worker's totals and repository loads/unloads reach
    every worker (the server's folder, from the parent), binds the SO_REUSEPORT socket, has any worker but the
    first start gRPC only when it joins the port, and makes the worker exit when the parent dies (no worker outlives
    a killed parent).
    """
    if settings.workers_dir is None:
        raise ConfigError(f"tuneline serve --worker-index: {WORKERS_DIR_ENV} is not set: workers are started by "
                          "`tuneline serve` with serve.workers > 1, not by hand")
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere a killed parent leaves workers running
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    config.headers = [*config.headers, (WORKER_HEADER, str(os.getpid()))]
    app.state.metrics.aggregate(settings.workers_dir / METRICS_DIR)
    app.state.siblings = Siblings(settings.workers_dir, index, settings.workers)
    app.state.dataplane.siblings = app.state.siblings  # GET /v2/live and the drift gauge merge every worker's numbers
    app.state.grpc_joins_later = index > 0  # WorkerServer calls app.state.start_grpc when it joins
    sock = reuseport_socket(settings.host, settings.port)
    log.info("worker", extra={"event": "worker", "worker": index, "pid": os.getpid(), "port": settings.port})
    return functools.partial(WorkerServer, sock=sock, index=index, host=settings.host)
