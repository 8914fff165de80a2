"""Where the study lives: its RDB URL, opening it (SQLite in WAL mode, PostgreSQL), passwords kept out of messages."""

from __future__ import annotations

import warnings
from pathlib import Path

from tasks.config import ConfigError, TuneConfig

STORAGE_ENV = "TUNELINE_TUNE_STORAGE"  # wins over tune.storage: keeps a database password out of params.yaml


def storage_url(cfg: TuneConfig, tuning_dir: Path, override: str | None = None) -> str:
    """The study's RDB URL: `override` ($TUNELINE_TUNE_STORAGE, read by the caller), else tune.storage, else
    SQLite under paths.tuning.

    PostgreSQL (postgresql://user:pass@host/db) lets workers on many machines share one study.
    """
    return override or cfg.storage or f"sqlite:///{Path(tuning_dir).resolve() / 'study.db'}"


def redact(url: str) -> str:
    """The URL with its password masked, for logs and error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: say nothing about it rather than leak it
        return "<unparseable storage URL>"


def open_storage(url: str):
    """Optuna's RDBStorage for `url`, with heartbeats; a ConfigError (password masked) when it cannot be opened."""
    import optuna
    import sqlalchemy.exc

    # A heartbeat lets a rerun mark trials of a killed worker as failed (and retry them once) instead
    # of leaving them RUNNING forever; SQLite's busy timeout covers several local workers writing at once,
    # pre-ping drops server connections that died while a trial trained (PostgreSQL restarts, idle cuts).
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable in practice since 2.x
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=10, grace_period=30,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        if url.startswith("sqlite"):
            _sqlite_write_ahead_log(storage.engine)
        return storage
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError, ModuleNotFoundError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"tune.storage: cannot open the study storage {redact(url)}: {reason}. Check that the "
                          f"database server is up and the URL (or ${STORAGE_ENV}) is right") from None


def _sqlite_write_ahead_log(engine) -> None:
    """SQLite in WAL mode with synchronous=NORMAL: a commit no longer waits for an fsync.

    Optuna commits several times per trial and epoch (ask, params, report, prune check, tell, heartbeat);
    with the default rollback journal each commit costs an fsync (6-40 ms on this disk), which was a fixed
    cost of every short trial. WAL keeps every committed trial through a killed process (only an OS crash
    or power cut can lose the last commits), and readers no longer block the writer. Local disks only:
    WAL needs shared memory, so a study on a network filesystem belongs in PostgreSQL.
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # persistent in the file; cheap to repeat
        cursor.execute("PRAGMA synchronous=NORMAL")  # per connection
        cursor.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections pooled while Optuna created its tables reconnect with the pragmas
