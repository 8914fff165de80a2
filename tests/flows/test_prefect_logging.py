"""`tuneline run` quiets the temporary Prefect server's connection-pool log (flows/prefect_logging.py): that
server, stopped with SIGTERM as the run ends, can log a CancelledError traceback after the run's verdict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneline.flows.prefect_logging import QUIETED, prefect_default_logging_file, write_logging_settings

pytestmark = pytest.mark.fast

# In a fresh interpreter, as the server subprocess does: Prefect configures logging from the settings file, then a
# pool error and an engine error are logged; only the engine's may reach the console.
PROBE = """
import logging
from prefect.logging.configuration import setup_logging
setup_logging()
logging.getLogger("sqlalchemy.pool.impl.AsyncAdaptedQueuePool").error("Exception during reset or similar")
logging.getLogger("sqlalchemy.engine").error("an engine error stays visible")
"""


def run_probe(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def probe_env(tmp_path: Path, settings: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING_SETTINGS")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if settings is not None:
        env["PREFECT_LOGGING_SETTINGS_PATH"] = str(settings)
    return env


def test_the_written_config_is_prefects_own_plus_the_quieted_pool(tmp_path: Path):
    settings = write_logging_settings(tmp_path)
    ours = yaml.safe_load(settings.read_text())
    prefects = yaml.safe_load(prefect_default_logging_file().read_text())
    assert ours["loggers"] == {**prefects["loggers"], **QUIETED}
    assert {k: v for k, v in ours.items() if k != "loggers"} == {k: v for k, v in prefects.items() if k != "loggers"}
    mtime = settings.stat().st_mtime_ns
    assert write_logging_settings(tmp_path) == settings and settings.stat().st_mtime_ns == mtime  # unchanged: kept


def test_the_pool_error_is_quieted_and_other_errors_are_not(tmp_path: Path):
    quiet = run_probe(probe_env(tmp_path, write_logging_settings(tmp_path)))
    assert "an engine error stays visible" in quiet and "Exception during reset" not in quiet
    # Prefect's own config (what a run printed before): the pool's error reaches the console.
    loud = run_probe(probe_env(tmp_path, None))
    assert "Exception during reset" in loud
