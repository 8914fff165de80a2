"""Prefect's own logging config with one library logger quieted: the temporary API server's connection pool.

`tuneline run` lets Prefect start its temporary API server as a subprocess, which Prefect stops with SIGTERM
when the run ends. A database connection being handed back to SQLAlchemy's pool at that moment is cancelled,
and the pool logs "Exception during reset or similar" with a CancelledError traceback, printed after the run's
own one-line verdict (seen once in four fresh-clone CI runs, after a failed gate, 2026-12-06). It is noise from
a server that is going away, and nothing is lost: that server's database is the run's own scratch record.

The config written here is the installed Prefect's logging.yml (read from its package, so it follows Prefect's
version) plus `sqlalchemy.pool` at CRITICAL. PREFECT_LOGGING_SETTINGS_PATH names it, and the server subprocess
inherits that. A PREFECT_LOGGING_SETTINGS_PATH the user set is left alone.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import yaml

QUIETED = {"sqlalchemy.pool": {"level": "CRITICAL"}}


def prefect_default_logging_file() -> Path | None:
    """The installed Prefect's logging.yml, found without importing Prefect (its settings are read at import)."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "logging" / "logging.yml"
    return path if path.is_file() else None


def write_logging_settings(folder: Path) -> Path | None:
    """Write `folder/logging.yml` (Prefect's config + QUIETED), rewritten only when it changes; None if impossible."""
    default = prefect_default_logging_file()
    if default is None:
        return None
    config = yaml.safe_load(default.read_text())
    config.setdefault("loggers", {}).update(QUIETED)
    text = "# Written by `tuneline run` (flows/prefect_logging.py): Prefect's logging.yml + quieted loggers.\n"
    text += yaml.safe_dump(config, sort_keys=False)
    target = Path(folder) / "logging.yml"
    try:
        if not target.is_file() or target.read_text() != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staged.write_text(text)
            os.replace(staged, target)
    except OSError:  # a read-only project: Prefect's own config then applies, noise included
        return None
    return target


def quiet_server_pool_logs(prefect_home: Path) -> None:
    """Point PREFECT_LOGGING_SETTINGS_PATH at the quieted config, unless the user chose a config of their own."""
    if "PREFECT_LOGGING_SETTINGS_PATH" in os.environ:
        return
    settings = write_logging_settings(prefect_home)
    if settings is not None:
        os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(settings)
