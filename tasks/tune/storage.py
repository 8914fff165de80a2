"""Where the study lives: its RDB URL, opening it (SQLite in WAL mode, PostgreSQL), passwords kept out of messages."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from tuneline.core.config.base import ConfigError
from tuneline.core.config.tune import TuneConfig

STORAGE_ENV = "TUNELINE_TUNE_STORAGE"  # wins over tune.storage: keeps a database password out of params.yaml

# How long a storage call keeps retrying a lost database connection before it gives up. A PostgreSQL restart
# or failover takes seconds; a trial (and its heartbeat) waits it out instead of failing and leaving a
# RUNNING orphan behind. Retries start at 0.2 s and double up to 5 s between attempts.
RECONNECT_S = 60.0

log = logging.getLogger(__name__)


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
            storage = _reconnecting_storage_class()(
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


def _lost_connection(exc: BaseException) -> bool:
    """True when `exc` (or its cause) is the database going away, not a bad statement or a conflict."""
    import sqlalchemy.exc

    seen = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True  # server closed the connection, refused it, or is shutting down
        seen = seen.__cause__ or seen.__context__
    return False


def _reachable(storage) -> bool:
    """Whether the storage's database answers a trivial query now (a fresh connection, not a pooled one)."""
    try:
        with storage.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure to connect means "not reachable"
        return False


_RECONNECTING = None

# Private RDBStorage methods that Optuna calls from outside the class (its _CachedStorage reads every trial through
# `_get_trials`, creates trials through `_create_new_trial`, ...) and that each run one transaction of their own, so
# they need the retry as much as the public ones. Private helpers that take a caller's session are not listed:
# retrying one of them alone would replay half a transaction.
OWN_TRANSACTION_PRIVATE_METHODS = ("_get_stale_trial_ids", "_get_trials", "_create_new_trial", "_get_best_trial_id",
                                   "_set_trial_param")


def _reconnecting_storage_class():
    """RDBStorage whose every public call retries a lost connection for up to RECONNECT_S.

    Optuna turns a dropped connection into StorageInternalError and gives up, so a database restart in the
    middle of a study would fail the running trial and, worse, its `tell` (the database is still down),
    leaving it RUNNING and the worker dead. Each call is one transaction that rolled back when the connection
    died, so repeating it is safe; pool_pre_ping swaps the dead pooled connections for new ones.
    (The one exception, a commit that reached the server whose reply was lost, is the usual at-least-once
    caveat of any client; a repeated state change then reads as UpdateFinishedTrialError, which callers handle.)
    """
    global _RECONNECTING
    if _RECONNECTING is not None:
        return _RECONNECTING
    import functools

    import optuna
    import sqlalchemy.exc

    def reconnecting(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            deadline, pause = time.monotonic() + RECONNECT_S, 0.2
            while True:
                try:
                    return method(self, *args, **kwargs)
                except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
                    # The error names a lost connection, or (whatever DBAPI error the driver chose for a
                    # server going down mid-commit) the database cannot be reached right now: both transient.
                    transient = _lost_connection(exc) or not _reachable(self)
                    if not transient or time.monotonic() + pause > deadline:
                        raise
                    cause = getattr(exc.__cause__, "orig", None) or exc.__cause__ or exc
                    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
                    log.warning("tune: study storage connection lost in %s (%s); retrying in %.1f s",
                                method.__name__, reason, pause)
                    time.sleep(pause)
                    pause = min(2 * pause, 5.0)
        return call

    base = optuna.storages.RDBStorage
    names = [name for name, value in vars(base).items()
             if callable(value) and (not name.startswith("_") or name in OWN_TRANSACTION_PRIVATE_METHODS)
             and name not in ("upgrade", "remove_session", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback")]
    _RECONNECTING = type("ReconnectingRDBStorage", (base,), {name: reconnecting(getattr(base, name)) for name in names}
                         | {"__module__": __name__})
    globals()["ReconnectingRDBStorage"] = _RECONNECTING  # picklable by reference, as RDBStorage is
    return _RECONNECTING
