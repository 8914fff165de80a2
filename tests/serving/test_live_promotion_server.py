"""The live loop end to end on a real server: a challenger shadowed on live traffic, `tuneline models promote --live`
reading that server's /v2/live window (not a stand-in document), refusing on a live gate, then promoting, and the
server following the registry to serve the new champion."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving.conftest import run_server, wait_until
from tuneline.core.registry_reader import registry_events
from tuneline.flows.cli import main
from tuneline.flows.params_file import write_overrides
from tuneline.tasks.evaluate.gate import gate_min
from tuneline.tasks.ship.registry import Registry

REPO = Path(__file__).resolve().parents[2]
INFER = "/v2/models/mnist/infer"
CARD_GATES = [gate_min("gate.min_accuracy", "test accuracy", 0.99, 0.98).to_dict()]  # the offline gates held


def _body(image: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                   "data": image.ravel().tolist()}]}).encode()


@pytest.fixture
def project(tmp_path, onnx_model, other_model):
    """params.yaml + a registry: v0001 (onnx_model) champion, v0002 (other weights) challenger."""
    saved = dict(os.environ)
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    registry = Registry(tmp_path / "registry", "mnist")
    for path in (onnx_model, other_model.path):
        registry.register({"model.onnx": path}, metrics={"accuracy": 0.99}, gates=CARD_GATES, lineage={}, run_id=None)
    registry.promote("v0001", by="pipeline", reason="first")
    registry.promote("v0002", "challenger", by="pipeline", reason="kept as challenger")
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def test_promote_live_judges_a_real_servers_shadow_window_and_the_server_then_serves_the_new_champion(
        project, digits, other_model, capsys):
    n = 120
    agreement = float(np.mean(digits.classes[:n] == other_model.logits[:n].argmax(1)))
    assert 0.0 < agreement < 1.0  # the two models differ on some digits: the gate has something to judge
    registry = Registry(project / "registry", "mnist")
    promote = lambda: main(["--project", str(project), "models", "promote", "--live", "--server", server.url])  # noqa: E731
    with run_server(project / "registry", challenger="shadow", shadow_percent=100) as server:
        slot = server.holder.slots["mnist"]
        wait_until(lambda: slot.challenger is not None, what="the challenger loaded")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i in range(n):
                assert client.post(INFER, content=_body(digits.images[i])).headers["x-tuneline-version"] == "v0001"
            wait_until(lambda: client.get("/v2/live/mnist").json()["challenger"]["compared"] == n,
                       what="every request shadowed")

            # A bar just above what the server measured: refused, on that gate, with the server's numbers.
            write_overrides(project / "params.yaml", {"gate.live_min_requests": n,
                                                      "gate.live_min_agreement": round(agreement + 0.01, 4)})
            assert promote() == 1
            out, err = capsys.readouterr()
            # The CLI's one line; the server in this process may log JSON lines to the same stderr meanwhile.
            err = "\n".join(line for line in err.strip().splitlines() if not line.startswith("{"))
            assert out == "" and len(err.splitlines()) == 1, err
            assert "not promoted (champion v0001 stays)" in err and "gate.live_min_agreement" in err, err
            assert f"requests {n} ≥ {n}" in err and f"agreement {agreement:.4g} <" in err, err
            assert registry.alias_version("champion") == "v0001"

            # Just below it: promoted, recorded in the event log with the live numbers.
            write_overrides(project / "params.yaml", {"gate.live_min_agreement": round(agreement - 0.01, 4)})
            assert promote() == 0
            out, _ = capsys.readouterr()
            assert out.startswith("mnist v0002 promoted to champion on live evidence (was v0001)"), out
            assert registry.alias_version("champion") == "v0002"
            event = registry_events(project / "registry").events[-1]
            assert (event.by, event.from_version, event.to_version) == ("live", "v0001", "v0002")
            assert event.numbers["requests"] == n and event.numbers["agreement"] == pytest.approx(agreement)

            # The server follows the registry: the new champion answers, with its own logits.
            wait_until(lambda: slot.champion is not None and slot.champion.version == "v0002", what="v0002 served")
            answer = client.post(INFER, content=_body(digits.images[0]))
            assert answer.headers["x-tuneline-version"] == "v0002"
            np.testing.assert_allclose(answer.json()["outputs"][0]["data"], other_model.logits[0], atol=1e-3)
