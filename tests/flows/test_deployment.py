"""Operating Tuneline through a real Prefect server backed by a real PostgreSQL: work pool, `prefect deploy
--all` from prefect.yaml, a process worker, `prefect deployment run 'tuneline/adhoc'` with an override, on a slice of real MNIST;
the worker's flow-run logs carry the stage lines, and a run failed at a gate says which gate in its state message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tuneline.tasks.ship.registry import Registry
from tests.conftest import cli_env
from tests.flows.test_pipeline import SLICE

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "prefect server exited during start-up"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server at {url} not healthy within {timeout} s")


def api_post(url: str, body: dict) -> list | dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def scheduled_runs(api: str, deployment: str) -> list[dict]:
    """The server's SCHEDULED flow runs of one deployment of the tuneline flow."""
    (found,) = [d for d in api_post(f"{api}/deployments/filter", {}) if d["name"] == deployment]
    runs = api_post(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                                                 "deployments": {"id": {"any_": [found["id"]]}}})
    return runs


def run_logs(api: str, flow_run_id: str, must_hold: list[str], timeout: float = 30) -> list[str]:
    """The flow run's log messages, read through the API once each of `must_hold` is in one of them (the flow-run
    process ships its logs in batches, and the last batch may land just after the run's final state)."""
    deadline = time.monotonic() + timeout
    while True:
        messages: list[str] = []
        while batch := api_post(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                        "sort": "TIMESTAMP_ASC", "offset": len(messages), "limit": 200}):
            messages += [log["message"] for log in batch]
        if all(any(text in m for m in messages) for text in must_hold) or time.monotonic() > deadline:
            return messages
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the process group (a worker ignores SIGTERM from scripts), then make sure it is gone."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def prefect_database_url(request, tmp_path: Path) -> str:
    """The production store, PostgreSQL (a real server, tests/pg_server.py); SQLite only where PostgreSQL
    cannot be installed (the postgres fixture then says why, and CI's TUNELINE_REQUIRE_POSTGRES=1 fails)."""
    try:
        return request.getfixturevalue("postgres_db").replace("postgresql://", "postgresql+asyncpg://", 1)
    except pytest.skip.Exception as skipped:
        print(f"prefect server on SQLite: {skipped}")
        return f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"


def test_adhoc_deployment_runs_on_a_process_worker(project: Path, mnist_mirror: Path, tmp_path: Path,
                                                   prefect_database_url: str):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = cli_env(mnist_mirror)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_API_DATABASE_CONNECTION_URL=prefect_database_url,
               TUNELINE_PROJECT_DIR=str(project),
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # schedule nightly's runs within seconds
               # as docs/operations.md starts the server: it streams run logs to `--watch` (off by default)
               PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true", PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true")
    prefect = str(BIN / "prefect")
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        started.append(server)
        wait_healthy(api, server)

        def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            result = subprocess.run([prefect, "--no-prompt", *args], cwd=project, env=env, capture_output=True,
                                    text=True, timeout=timeout)
            assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
            return result

        cli("work-pool", "create", "tuneline-process", "--type", "process")
        deployed = cli("deploy", "--all")
        assert "tuneline/nightly" in deployed.stdout and "tuneline/adhoc" in deployed.stdout

        # The nightly deployment carries its cron schedule, and the server schedules its next runs.
        nightly = cli("deployment", "inspect", "tuneline/nightly").stdout
        assert "0 2 * * *" in nightly
        deadline = time.monotonic() + 60
        while not (scheduled := scheduled_runs(api, "nightly")):
            assert time.monotonic() < deadline, "no scheduled run of tuneline/nightly within 60 s"
            time.sleep(1)
        assert all(run["expected_start_time"][11:16] == "02:00" for run in scheduled)

        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "tuneline-process"], cwd=project, env=env,
                                  stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        started.append(worker)
        overrides = dict(kv.split("=", 1) for kv in [*SLICE, "gate.min_accuracy=0.8"])
        overrides = {k: yaml.safe_load(v) for k, v in overrides.items()}
        committed = (project / "params.yaml").read_bytes()
        run = cli("deployment", "run", "tuneline/adhoc", "--params", json.dumps({"overrides": overrides}),
                  "--watch", "--watch-timeout", "900", timeout=960)
        assert "Completed" in run.stdout, run.stdout + (logs / "worker.log").read_text()[-3000:]

        (flow_run,) = [r for r in api_post(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})]
        artifacts = {a["key"]: a for a in api_post(f"{api}/artifacts/filter",
                                                   {"artifacts": {"flow_run_id": {"any_": [str(flow_run["id"])]}}})}
        assert {"tuneline-run-summary", "tuneline-top-trials", "tuneline-train-history", "tuneline-onnx-model"} <= set(artifacts)
        assert "gate.min_accuracy" in artifacts["tuneline-run-summary"]["data"]
        assert flow_run["parameters"]["overrides"]["gate.min_accuracy"] == 0.8
        # The adhoc run was an experiment in a workspace of its own: the worker's checkout is as it was (the next
        # nightly runs the committed params.yaml), its model went to the project's registry, its record to git.
        assert (project / "params.yaml").read_bytes() == committed
        assert not (project / "models" / "model.onnx").exists()
        assert Registry(project / "registry").alias("champion")["version"] == "v0001"
        assert "gates passed" in artifacts["tuneline-run-summary"]["data"]
        experiments = subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=project, capture_output=True,
                                     text=True, check=True).stdout
        assert "run-" in experiments

        # What ran is in the worker's flow-run logs, as in a terminal: each epoch, the metrics and gate verdicts.
        stage_lines = ["train: epoch 1/2 train_loss", "train: epoch 2/2 train_loss",
                       "evaluate: test accuracy", "gate gate.min_accuracy passed: test accuracy", "export: ONNX Runtime on",
                       "promote: v0001 promoted to champion"]
        messages = run_logs(api, flow_run["id"], stage_lines)
        missing = [text for text in stage_lines if not any(text in m for m in messages)]
        assert not missing, f"not in the flow run's logs: {missing}\n" + "\n".join(messages)

        # A run that fails at a gate ends Failed with the reason, one line naming the gate, as its state message
        # (fetch..export come back from DVC's run-cache in its own workspace: only evaluate reruns).
        gate_above_reach = {"overrides": {**overrides, "gate.min_accuracy": 0.999}}
        failing = subprocess.run([prefect, "--no-prompt", "deployment", "run", "tuneline/adhoc", "--params",
                                  json.dumps(gate_above_reach), "--watch", "--watch-timeout", "600"],
                                 cwd=project, env=env, capture_output=True, text=True, timeout=660, check=False)
        assert failing.returncode == 1 and "Failed" in failing.stdout, failing.stdout + failing.stderr
        (failed_run,) = api_post(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}})
        message = failed_run["state"]["message"]
        assert "GateFailed: gate gate.min_accuracy FAILED: test accuracy" in message, message
        assert "threshold 0.9990" in message and "\n" not in message, message
        watched = " ".join(failing.stdout.split())  # rich wraps long lines at the terminal's width
        assert "gate gate.min_accuracy FAILED" in watched, failing.stdout  # --watch shows the reason too
        assert (project / "params.yaml").read_bytes() == committed  # a failed run with overrides leaves it too
        if prefect_database_url.startswith("postgresql"):  # the runs really live in PostgreSQL
            import psycopg

            with psycopg.connect(prefect_database_url.replace("+asyncpg", "")) as conn:
                states = dict(conn.execute("SELECT d.name, count(*) FROM flow_run r JOIN deployment d "
                                           "ON r.deployment_id = d.id WHERE r.state_type = 'COMPLETED' "
                                           "GROUP BY d.name").fetchall())
            assert states == {"adhoc": 1}
    finally:
        for proc in reversed(started):
            stop(proc)
    assert all(proc.poll() is not None for proc in started)
