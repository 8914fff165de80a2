"""The pipeline's post-promotion notification (flows/pipeline.py notify_server) sent to a real server on loopback:
the server, whose registry watch is off, loads the new champion because of it, and answers with its weights.

The flow calls the task after promote_model; here its function runs directly (no Prefect API to start), as the
flow's task runs it. The mutant is a notify that never calls: the server then keeps the old champion.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tuneline.core.config.params import build_params
from tuneline.flows import pipeline
from tuneline.tasks.ship.promote import PromoteResult
from tests.serving.conftest import run_server
from tests.serving.registry_helper import make_registry, register_version, set_alias


def never_calls(monkeypatch) -> None:
    """Mutant: a notify that reports success without sending anything."""
    monkeypatch.setattr(pipeline.notify_server, "fn", lambda params, promotion: f"inference server "
                        f"{params.serve.notify_url}: loaded mnist version {promotion.version} as champion")


MUTANT = pytest.mark.xfail(strict=True, raises=AssertionError, reason="the mutant must fail this test")


@pytest.mark.parametrize("mutant", [None, pytest.param(never_calls, marks=MUTANT, id="never-calls")])
def test_a_promotion_notifies_the_server_which_loads_the_new_champion(tmp_path, onnx_model, other_model, digits,
                                                                      mutant, monkeypatch):
    if mutant:
        mutant(monkeypatch)
    registry = make_registry(tmp_path, onnx_model)  # v0001 champion: the digits model
    body = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                        "data": digits.images[0].ravel().tolist()}], "outputs": [{"name": "logits"}]}
    # reload_poll_s=0: no registry watch, so only the notification can make the server load v0002. The admin token
    # guards the load route: the notification must carry TUNELINE_SERVE_ADMIN_TOKEN as its bearer token.
    with run_server(registry, reload_poll_s=0, admin_token="admin-token") as running:
        monkeypatch.setenv("TUNELINE_SERVE_ADMIN_TOKEN", "admin-token")
        version = register_version(registry, other_model.path)  # v0002: other weights, promoted
        set_alias(registry, version)
        params = build_params({}, {"serve.notify_url": running.url + "/", "project.name": "mnist"})
        promotion = PromoteResult(version=version, registered=True, promoted=True, reason="test", champion=version,
                                  name="mnist")
        said = pipeline.notify_server.fn(params, promotion)
        assert said == f"inference server {running.url}/: loaded mnist version v0002 as champion"
        answer = httpx.post(running.url + "/v2/models/mnist/infer", json=body).json()
        assert answer["model_version"] == "v0002", "the server did not load the promoted champion"
        assert np.allclose(answer["outputs"][0]["data"], other_model.logits[0], atol=1e-4)
        assert running.metric('tuneline_http_requests_total{endpoint="/v2/repository/models/{name}/load",'
                              'method="POST",status="200"}') == 1


def test_without_a_server_url_nothing_is_sent_and_the_run_is_told_so():
    params = build_params({}, {})
    promotion = PromoteResult(version="v0002", registered=True, promoted=True, reason="test", champion="v0002")
    assert pipeline.notify_server.fn(params, promotion) == ("no inference server configured (serve.notify_url): "
                                                            "not notified")


def test_a_server_that_cannot_be_reached_is_a_warning_not_a_failed_run(monkeypatch, caplog):
    """The champion is already promoted and tracked when the flow notifies: a server that is down must not fail the
    run (the server's registry watch picks the champion up); the warning names the URL and what to do."""
    import logging
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(pipeline, "notify_server", pipeline.notify_server.with_options(retries=0))
    params = build_params({}, {"serve.notify_url": url, "project.name": "mnist"})
    promotion = PromoteResult(version="v0002", registered=True, promoted=True, reason="test", champion="v0002",
                              name="mnist")
    logger = logging.getLogger("test-notify")
    with caplog.at_level(logging.WARNING, logger="test-notify"):
        said = pipeline._notify(params, promotion, logger)
    assert said == "inference server not notified (see the warning above)"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "test-notify"]
    assert warning.startswith(f"inference server {url}: not notified of v0002 (")
    assert "serve.reload_poll_s" in warning
