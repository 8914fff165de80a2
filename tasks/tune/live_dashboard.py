"""`tuneline tune --dashboard`: optuna-dashboard served beside a tuning run, for as long as the run lasts.

It runs in a process of its own (spawned: the dashboard's server threads never take the trials' GIL or
cores' time slices in the tuner's process) that waits for the study storage to exist (a new SQLite file is
created by the tune call itself), then serves it on loopback; the tuner stops it when the study ends.
"""

from __future__ import annotations

import multiprocessing
import time
from contextlib import contextmanager
from pathlib import Path

from tuneline.tasks.tune.dashboard import DEFAULT_PORT, dashboard_url, serve_dashboard

WAIT_FOR_STORAGE_S = 600.0


def _serve_when_ready(url: str, host: str, port: int) -> None:
    if url.startswith("sqlite:///"):
        path, deadline = Path(url.removeprefix("sqlite:///")), time.monotonic() + WAIT_FOR_STORAGE_S
        while not path.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
    serve_dashboard(url, host, port)


@contextmanager
def dashboard_beside(url: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
    """Serve optuna-dashboard for the storage at `url` while the block runs; yields the dashboard's URL."""
    proc = multiprocessing.get_context("spawn").Process(target=_serve_when_ready, args=(url, host, port), daemon=True)
    proc.start()
    print(f"tuneline: dashboard of this study on {dashboard_url(host, port)} while it runs", flush=True)
    try:
        yield dashboard_url(host, port)
    finally:
        proc.terminate()
        proc.join(5)
