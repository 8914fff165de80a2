"""Promotion on live evidence: the challenger becomes champion only when its offline gates held and the server's live
window meets every gate.live_* threshold; either way one line says why, with the numbers.

The decision is a pure function (most tests); the end-to-end tests run `tuneline models promote --live` against a
real HTTP server on loopback (a stdlib http.server answering a /v2/live document in the server's format) and a real
registry."""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tuneline.core.config.gate import GateConfig
from tuneline.core.registry_reader import registry_events
from tuneline.flows.cli import main
from tuneline.tasks.evaluate.gate import gate_max, gate_min
from tuneline.tasks.ship.live import (LiveError, LiveWindow, OfflineVerdict, decide_live, offline_verdict,
                                      run_live_promote)
from tuneline.tasks.ship.registry import Registry
from tests.tasks.registry_worker import tiny_model

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[3]
HELD = OfflineVerdict(True, "offline gates held (3 blocking)")
GATES = GateConfig(live_min_requests=1000, live_min_agreement=0.97, live_max_error_rate=0.01, live_max_p99_ms=100.0)


def live_payload(requests=1500, agreement=0.985, error_rate=0.002, p99=12.5, challenger="v0002", champion="v0001",
                 mode="shadow", **extra) -> dict:
    """A /v2/live/mnist document as the server writes it."""
    side = {"requests": requests, "errors": round(requests * error_rate), "error_rate": error_rate,
            "latency_ms": {"p50": 3.1, "p99": p99}, "mean_confidence": 0.97, "class_counts": {"0": 150, "1": 160}}
    return {"model": "mnist", "mode": mode,
            "champion": {**side, "version": champion, "requests": 15000, "error_rate": 0.001,
                         "latency_ms": {"p50": 2.9, "p99": 10.0}},
            "challenger": None if challenger is None else {**side, "version": challenger, "agreement": agreement,
                                                           "compared": requests, "dropped": 3, **extra},
            "drift": {"score": 0.02, "threshold": 0.1, "window": 500, "drifted": False}}


def decide(payload: dict, cfg: GateConfig = GATES, offline: OfflineVerdict = HELD):
    return decide_live(LiveWindow.from_dict(payload), cfg, offline, "v0001", "v0002")


def test_a_window_that_meets_every_live_gate_passes_with_its_numbers():
    decision = decide(live_payload())
    assert decision.ok, decision.reason
    assert decision.reason == ("live gates held (shadow): requests 1500 ≥ 1000, agreement 0.985 ≥ 0.97, "
                               "error rate 0.002 ≤ 0.01, p99 ms 12.5 ≤ 100; offline gates held (3 blocking)")
    assert decision.numbers["agreement"] == 0.985 and decision.numbers["gate.live_min_requests"] == 1000


@pytest.mark.parametrize("change, failing", [
    ({"requests": 999}, "gate.live_min_requests"),
    ({"agreement": 0.96}, "gate.live_min_agreement"),
    ({"agreement": None}, "gate.live_min_agreement"),      # a canary window measures no agreement: cannot pass
    ({"error_rate": 0.02}, "gate.live_max_error_rate"),
    ({"p99": 100.5}, "gate.live_max_p99_ms"),
])
def test_each_live_gate_refuses_on_its_own(change, failing):
    decision = decide(live_payload(**change))
    assert not decision.ok
    assert decision.reason.startswith(f"live gate {failing} not met (shadow): ")
    assert "\n" not in decision.reason


def test_labelled_accuracy_is_checked_when_set_and_a_null_agreement_gate_is_not():
    cfg = GATES.model_copy(update={"live_min_accuracy": 0.95, "live_min_agreement": None})
    assert decide(live_payload(agreement=None, labelled_accuracy=0.96, labelled=400), cfg).ok
    refused = decide(live_payload(agreement=None, labelled_accuracy=0.90, labelled=400), cfg)
    assert not refused.ok and "gate.live_min_accuracy not met" in refused.reason
    assert "labelled accuracy 0.9 < 0.95" in refused.reason
    assert not decide(live_payload(agreement=None), cfg).ok  # no labels at all: the gate cannot be judged


def test_offline_gates_and_the_window_versions_must_hold_too():
    failed = OfflineVerdict(False, "offline gate gate.min_accuracy FAILED: test accuracy 0.9800 vs threshold 0.9900")
    refused = decide(live_payload(), offline=failed)
    assert not refused.ok and refused.reason.startswith("offline gate gate.min_accuracy FAILED")
    stale = decide(live_payload(challenger="v0003"))
    assert not stale.ok and "live window is of v0003, the registry's challenger is v0002" in stale.reason
    assert not decide(live_payload(champion="v0000")).ok
    off = decide(live_payload(challenger=None, mode="off"))
    assert not off.ok and "no live window of a challenger (mode off)" in off.reason


def test_offline_verdict_reads_the_card_gates():
    passed = [gate_min("gate.min_accuracy", "test accuracy", 0.995, 0.99).to_dict(),
              gate_max("gate.max_size_mb", "size", 1.0, 20.0).to_dict(),
              gate_min("gate.min_improvement", "change", 0.0, 0.001, blocking=False).to_dict()]  # why it is challenger
    assert offline_verdict({"version": "v0002", "gates": passed}) == OfflineVerdict(True, "offline gates held (2 blocking)")
    failing = [*passed, gate_min("gate.max_regression", "change", -0.01, -0.005).to_dict()]
    verdict = offline_verdict({"version": "v0002", "gates": failing})
    assert not verdict.held and "gate.max_regression FAILED" in verdict.reason
    assert not offline_verdict({"version": "v0002", "gates": []}).held


def test_a_document_that_is_not_a_live_window_is_a_clear_error():
    with pytest.raises(LiveError, match="not a /v2/live summary"):
        LiveWindow.from_dict({"status": "ok"})
    bad = live_payload()
    del bad["challenger"]["requests"]
    with pytest.raises(LiveError, match="challenger: not a live window"):
        LiveWindow.from_dict(bad)


# --- end to end: a real registry, a real HTTP server on loopback, the real command line -----------------------------

CARD_GATES = [gate_min("gate.min_accuracy", "test accuracy", 0.995, 0.99).to_dict(),
              gate_min("gate.max_regression", "accuracy change vs champion", 0.0005, -0.005).to_dict(),
              gate_min("gate.min_improvement", "accuracy change vs champion", 0.0005, 0.001, blocking=False).to_dict()]


class LiveServer:
    """A loopback HTTP server answering GET /v2/live/<model> with `payload` (what the inference server serves)."""

    def __init__(self):
        self.payload: dict = {}
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.paths.append(self.path)
                body = json.dumps(owner.payload).encode() if self.path == f"/v2/live/{owner.payload['model']}" else b"{}"
                self.send_response(200 if body != b"{}" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def project(tmp_path):
    """params.yaml + a registry: mnist v0001 champion, v0002 challenger (its card records offline gates)."""
    saved = dict(os.environ)
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    registry = Registry(tmp_path / "registry", "mnist")
    for i in range(2):
        registry.register({"model.onnx": tiny_model(tmp_path / f"m{i}.onnx", float(i))}, metrics={"accuracy": 0.995},
                          gates=CARD_GATES, lineage={}, run_id=None)
    registry.promote("v0001", by="pipeline", reason="first")
    registry.promote("v0002", "challenger", by="pipeline", reason="kept as challenger")
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def test_promote_live_refuses_a_failing_challenger_then_promotes_a_passing_one(project, capsys):
    cli = lambda *args: main(["--project", str(project), "models", "promote", "--live", *args])  # noqa: E731
    registry = Registry(project / "registry", "mnist")
    with LiveServer() as server:
        server.payload = live_payload(agreement=0.91)
        assert cli("--server", server.url) == 1
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("mnist v0002 not promoted (champion v0001 stays): live gate gate.live_min_agreement "
                              "not met (shadow): requests 1500 ≥ 1000, agreement 0.91 < 0.97"), err
        assert registry.alias_version("champion") == "v0001"
        assert [e.by for e in registry_events(project / "registry").events] == ["pipeline", "pipeline"]

        server.payload = live_payload()
        assert cli("--server", server.url) == 0
        out, err = capsys.readouterr()
        assert out.splitlines() == [
            "mnist v0002 promoted to champion on live evidence (was v0001): live gates held (shadow): requests 1500 ≥ "
            "1000, agreement 0.985 ≥ 0.97, error rate 0.002 ≤ 0.01, p99 ms 12.5 ≤ 100; offline gates held (2 blocking)"]
        assert server.paths == ["/v2/live/mnist", "/v2/live/mnist"]
    assert registry.alias_version("champion") == "v0002"
    event = registry_events(project / "registry").events[-1]
    assert (event.by, event.alias, event.from_version, event.to_version) == ("live", "champion", "v0001", "v0002")
    assert event.numbers["agreement"] == 0.985 and event.numbers["requests"] == 1500
    assert "live gates held" in event.reason

    with LiveServer() as server:  # the challenger is the champion now: nothing to promote
        server.payload = live_payload(champion="v0002")
        assert cli("--server", server.url) == 1
        assert "v0002 is the champion already" in capsys.readouterr().err


def test_promote_live_without_a_server_says_where_it_looked(project, capsys):
    with LiveServer() as server:
        url = server.url
    assert main(["--project", str(project), "models", "promote", "--live", "--server", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tuneline: models failed: GET {url}/v2/live/mnist: ") and "start the server" in err


def test_run_live_promote_refuses_a_window_of_another_model(project):
    window = LiveWindow.from_dict({**live_payload(), "model": "digits"})
    result = run_live_promote(GateConfig(), project / "registry", "mnist", window)
    assert not result.promoted and "the live window is of model 'digits'" in result.reason
