"""Retraining on drift: the drift watch flow reads the server's live window and, when the drift score is over its
threshold, starts the retraining deployment (tuneline/adhoc) on the captured data, once per cool-down.

With a real Prefect server (prefect_test_harness: a Prefect API server process on a throw-away SQLite database): the
"retraining run" is a flow run of tuneline/adhoc, registered here for a stand-in flow named `tuneline` (the real
pipeline would train for minutes; what is tested is that exactly one run is created, with the capture overrides).
The server's /v2/live answer comes from a loopback HTTP server in the server's format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tuneline.flows.drift_watch import WATCH_DIR, capture_overrides, decide_drift
from tuneline.core.config.params import build_params
from tuneline.tasks.ship.live import LiveWindow
from tests.tasks.ship.test_live_promotion import LiveServer, live_payload

REPO = Path(__file__).resolve().parents[2]
COOLDOWN_S = 3600.0


def drifted_payload(score: float, threshold: float = 0.1) -> dict:
    return {**live_payload(), "drift": {"score": score, "threshold": threshold, "window": 500,
                                        "drifted": score > threshold}}


@pytest.mark.fast
def test_decision_triggers_only_on_drift_after_the_cool_down_with_enough_labels():
    drifted, calm = LiveWindow.from_dict(drifted_payload(0.3)), LiveWindow.from_dict(drifted_payload(0.05))
    assert decide_drift(drifted, None, 1000.0, COOLDOWN_S, labelled=50, min_labelled=10).trigger
    assert not decide_drift(calm, None, 1000.0, COOLDOWN_S, 50, 10).trigger
    inside = decide_drift(drifted, 1000.0, 1000.0 + COOLDOWN_S - 1, COOLDOWN_S, 50, 10)
    assert not inside.trigger and "cool-down (watch.cooldown_s 3600 s) has 1 s left" in inside.reason
    assert decide_drift(drifted, 1000.0, 1000.0 + COOLDOWN_S, COOLDOWN_S, 50, 10).trigger
    few = decide_drift(drifted, None, 1000.0, COOLDOWN_S, 9, 10)
    assert not few.trigger and "fewer than watch.min_labelled 10" in few.reason
    assert capture_overrides(build_params({}), "mnist") == {"data.source": "capture", "data.capture_model": "mnist"}


@pytest.fixture
def project(tmp_path):
    """params.yaml (the cool-down one hour, 5 labelled requests enough) and a capture of 6 labelled mnist requests."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.setdefault("watch", {}).update(cooldown_s=COOLDOWN_S, min_labelled=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    capture = tmp_path / ".tuneline" / "capture"
    capture.mkdir(parents=True)
    (capture / "capture-0001.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "time": "2026-05-01T10:00:00+00:00", "model": "mnist", "version": "v0001",
                    "modality": "image", "input": [], "shape": [1, 28, 28], "class": 1, "probability": 0.9}) + "\n"
        for i in range(8)))
    (capture / "feedback-0001.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "label": 1}) + "\n"
                                                         for i in range(6)))
    return tmp_path


@pytest.mark.slow
def test_a_drift_over_the_threshold_starts_exactly_one_retraining_run_within_the_cool_down(project):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.testing.utilities import prefect_test_harness

    from tuneline.flows.drift_watch import drift_watch

    @flow(name="tuneline")
    def stand_in_pipeline(overrides: dict | None = None, project_dir: str = ".") -> None:
        """Registered as tuneline/adhoc: the deployment the drift watch starts."""

    with prefect_test_harness(server_startup_timeout=180), LiveServer() as server:
        with get_client(sync_client=True) as client:
            deployment_id = client.create_deployment(flow_id=client.create_flow(stand_in_pipeline), name="adhoc")

            def runs() -> list:
                return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

            server.payload = drifted_payload(0.05)  # under the threshold: nothing starts
            calm = drift_watch(project_dir=str(project), server=server.url)
            assert not calm["trigger"] and "no drift: drift score 0.05 vs threshold 0.1" in calm["reason"]
            assert runs() == []

            server.payload = drifted_payload(0.31)  # over it: one retraining run, on the captured data
            first = drift_watch(project_dir=str(project), server=server.url)
            assert first["trigger"], first["reason"]
            (run,) = runs()
            assert str(run.id) == first["flow_run_id"]
            assert run.parameters == {"overrides": {"data.source": "capture", "data.capture_model": "mnist"}}
            assert set(run.tags) >= {"drift", "mnist"}

            again = drift_watch(project_dir=str(project), server=server.url)  # still drifted, inside the cool-down
            assert not again["trigger"] and "cool-down" in again["reason"]
            assert len(runs()) == 1

            record_path = project / WATCH_DIR / "mnist.json"  # an hour later: the cool-down is over
            record = json.loads(record_path.read_text())
            assert record["flow_run_id"] == first["flow_run_id"] and record["score"] == 0.31
            record_path.write_text(json.dumps({**record, "unix_time": record["unix_time"] - COOLDOWN_S}))
            later = drift_watch(project_dir=str(project), server=server.url)
            assert later["trigger"] and len(runs()) == 2
