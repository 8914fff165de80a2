"""`tuneline dashboard`: optuna-dashboard over the project's live study storage, on loopback by default.

optuna-dashboard (a maintained Optuna project) reads the same RDB the workers write, so a study shows its
trials, intermediate values, importances and Pareto plots while it runs; nothing is copied or exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneline.core.config.base import ConfigError
from tuneline.tasks.tune.storage import open_storage, redact

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080


def dashboard_url(host: str, port: int, study_id: int | None = None) -> str:
    """The page of one study (its id in the storage), or the list of studies."""
    base = f"http://{host}:{port}/dashboard"
    return f"{base}/studies/{study_id}" if study_id is not None else f"{base}/"


def open_study_storage(url: str):
    """The storage the tuner writes; a ConfigError when a SQLite study file does not exist yet (never create it)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ConfigError(f"dashboard: no study storage at {path}: run `tuneline tune` (or `tuneline run`) first, "
                              "or point tune.storage / $TUNELINE_TUNE_STORAGE at the study's database")
    return open_storage(url)


def serve_dashboard(url: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
    """Serve optuna-dashboard for the study storage at `url` until interrupted (Ctrl-C); the exit code."""
    import optuna_dashboard

    storage = open_study_storage(url)
    studies = storage.get_all_studies()
    print(f"optuna-dashboard on {dashboard_url(host, port)} for {redact(url)} ({len(studies)} studies); Ctrl-C stops",
          flush=True)
    for study in studies:
        print(f"  {study.study_name}: {dashboard_url(host, port, study._study_id)}", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        pass
    return 0
