"""Repository load/unload are admin routes, and answers never show the registry's path (issue 16, defect 5)."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.conftest import require_or_skip
from tests.serving.conftest import run_server
from tests.serving.registry_helper import make_registry, register_version

LOAD, UNLOAD = "/v2/repository/models/mnist/load", "/v2/repository/models/mnist/unload"
V1 = {"parameters": {"version": "v0001"}}


def _non_loopback_address() -> str | None:
    """An address of this machine outside 127/8 (a client from it is not loopback), if there is one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, onnx_model):
    return make_registry(tmp_path_factory.mktemp("admin"), onnx_model, versions=2)


def test_without_an_admin_token_load_and_unload_are_loopback_only(two_versions):
    address = _non_loopback_address()
    if address is None:
        require_or_skip("this machine has no non-loopback IPv4 address: the refusal needs a client outside 127/8")
    with run_server(two_versions, host="0.0.0.0") as running:
        remote = f"http://{address}:{running.port}"
        for path, body in ((LOAD, {}), (LOAD, V1), (UNLOAD, V1)):
            refused = httpx.post(remote + path, json=body)
            assert refused.status_code == 403 and refused.headers["content-type"] == "application/json"
            assert "loopback clients only" in refused.json()["error"]
            assert "TUNELINE_SERVE_ADMIN_TOKEN" in refused.json()["error"]
        assert httpx.get(remote + "/v2/models/mnist").status_code == 200  # the rest stays open
        assert httpx.post(remote + "/v2/repository/index").status_code == 200  # reading is not admin
        assert httpx.post(running.url + LOAD, json=V1).status_code == 200  # from loopback: allowed
        assert httpx.post(running.url + UNLOAD, json=V1).status_code == 200
        assert running.metric('tuneline_http_rejected_total{reason="403"}') == 3


def test_admin_token_alone_opens_load_and_unload(two_versions, digits):
    with run_server(two_versions, token="serve-token", admin_token="admin-token") as running:
        serve = {"authorization": "Bearer serve-token"}
        admin = {"authorization": "Bearer admin-token"}
        for headers in ({}, serve, {"authorization": "Bearer wrong"}):
            refused = httpx.post(running.url + LOAD, json=V1, headers=headers)
            assert refused.status_code == 401 and "admin token" in refused.json()["error"]
        assert httpx.post(running.url + LOAD, json=V1, headers=admin).json()["version"] == "v0001"
        assert httpx.post(running.url + UNLOAD, json=V1, headers=admin).status_code == 200
        assert httpx.post(running.url + LOAD, headers=admin).json()["role"] == "champion"
        # The admin token is for admin routes only; the serving token still guards the rest.
        assert httpx.get(running.url + "/v2/models/mnist", headers=admin).status_code == 401
        assert httpx.get(running.url + "/v2/models/mnist", headers=serve).status_code == 200


def test_answers_never_show_the_registry_path(tmp_path, onnx_model):
    registry = tmp_path / "registry"
    with run_server(registry, wait_ready=False) as running:  # empty registry: "no model in the registry … yet"
        ready = httpx.get(running.url + "/v2/health/ready")
        assert ready.status_code == 503 and "<registry>" in ready.json()["error"]
        bodies = [ready.text]
    make_registry(tmp_path, onnx_model)
    register_version(registry, onnx_model, card_sha256="0" * 64)  # v0002: a checksum that cannot match
    with run_server(registry) as running:
        answers = [httpx.post(running.url + LOAD, json={"parameters": {"version": "v0002"}}),
                   httpx.post(running.url + LOAD, json={"parameters": {"version": "v0099"}}),
                   httpx.post(running.url + UNLOAD, json={"parameters": {"version": "v0099"}}),
                   httpx.get(running.url + "/v2/models/mnist/versions/v0099")]
        assert [a.status_code for a in answers] == [400, 404, 404, 404]
        assert "sha256" in answers[0].json()["error"] and "<registry>/" in answers[0].json()["error"]
        bodies += [a.text for a in answers]
    for body in bodies:
        assert str(registry) not in body and str(tmp_path) not in body, body


@pytest.mark.fast
def test_admin_token_comes_from_the_environment_only(tmp_path):
    from tuneline.serving.settings import build_settings, env_overrides
    from tuneline.core.config.params import Params

    environ = {"TUNELINE_SERVE_ADMIN_TOKEN": "admin-token"}
    assert env_overrides(environ) == {}  # not a params key: a token in params.yaml would end up in git
    settings = build_settings(Params(), tmp_path, environ)
    assert settings.admin_token.get_secret_value() == "admin-token" and settings.token is None
