"""64 concurrent clients each get their own rows; promoting a champion with other weights under that load fails no
request, and every answer is exactly one model's logits for its input, labelled with that model's version; a corrupt
model, a wrong checksum or a corrupt alias keeps the old model serving.

Versions that must be told apart hold different weights (registry_helper.write_other_weights): a reload that
changed the version label but kept the old session would pass a test on byte-identical copies, and fails these.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys

import httpx
import numpy as np
import pytest

from tests.serving.conftest import run_server, wait_until
from tests.serving.registry_helper import make_registry, register_version, set_alias

CLIENTS = 64


def _request(digits, client: int, step: int) -> tuple[dict, bytes, dict, np.ndarray]:
    """A request of 1–3 distinct images chosen by (client, step); binary or JSON by parity."""
    rows = 1 + (client + step) % 3
    index = (np.arange(rows) + client * 3 + step * 7) % len(digits.images)
    images = digits.images[index]
    if (client + step) % 2:
        tensor = {"name": "pixels", "shape": [rows, 784], "datatype": "UINT8",
                  "parameters": {"binary_data_size": images.nbytes}}
        head = json.dumps({"id": f"{client}-{step}", "inputs": [tensor],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
        return {}, head + images.tobytes(), {"inference-header-content-length": str(len(head))}, index
    body = {"id": f"{client}-{step}", "inputs": [{"name": "pixels", "shape": [rows, 1, 28, 28], "datatype": "FP32",
                                                  "data": images.astype(float).ravel().tolist()}],
            "outputs": [{"name": "logits"}]}
    return body, b"", {}, index


def _logits(response: httpx.Response) -> np.ndarray:
    length = response.headers.get("inference-header-content-length")
    if length is None:
        out = response.json()["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    head = json.loads(response.content[:int(length)])
    return np.frombuffer(response.content[int(length):], dtype="<f4").reshape(head["outputs"][0]["shape"])


async def _client_loop(url: str, digits, references: dict[str, np.ndarray], client: int, steps: int | None,
                       stop: asyncio.Event, seen: list, failures: list) -> None:
    """One client on its own keep-alive connection (one pool of 64 would cost httpcore O(n) per request).

    `references` maps each version that may answer to its logits for digits.images (ONNX Runtime on its file): an
    answer must equal exactly the reference of the version it is labelled with, for all its rows."""
    step = 0
    async with httpx.AsyncClient(timeout=30, verify=False) as http:  # plain http: skip loading CA certificates
        while (steps is None and not stop.is_set()) or (steps is not None and step < steps):
            body, content, headers, index = _request(digits, client, step)
            try:
                posting = http.post(url, json=body) if body else http.post(url, content=content, headers=headers)
                response = await posting
                if response.status_code != 200:
                    failures.append(f"{client}-{step}: HTTP {response.status_code} {response.text[:200]}")
                else:
                    length = int(response.headers.get("inference-header-content-length", len(response.content)))
                    head = json.loads(response.content[:length])
                    logits, version = _logits(response), head["model_version"]
                    matches = [v for v, reference in references.items()
                               if np.allclose(logits, reference[index], atol=1e-4)]
                    if head["id"] != f"{client}-{step}" or matches != [version]:
                        failures.append(f"{client}-{step}: labelled {version}, its logits for its own input are "
                                        f"{', '.join(matches) or 'no one model'}'s")
                    seen.append(version)
            except httpx.HTTPError as exc:
                failures.append(f"{client}-{step}: {type(exc).__name__} {exc}")
            step += 1


def _load(url: str, digits, references: dict[str, np.ndarray], steps: int | None = None,
          during=None) -> tuple[list, list]:
    """CLIENTS concurrent clients; `steps` requests each, or until `during` (a coroutine) has finished.

    Clients and server share this process: a short GIL switch interval keeps the two event loops from
    waiting 5 ms (the default) for each other at every hand-over.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        return asyncio.run(_load_async(url, digits, references, steps, during))
    finally:
        sys.setswitchinterval(interval)


async def _load_async(url: str, digits, references: dict[str, np.ndarray], steps: int | None,
                      during) -> tuple[list, list]:
    seen, failures, stop = [], [], asyncio.Event()
    clients = [asyncio.create_task(_client_loop(url, digits, references, c, steps, stop, seen, failures))
               for c in range(CLIENTS)]
    if during is not None:
        await during(seen)
        stop.set()
    await asyncio.gather(*clients)
    return seen, failures


def test_64_concurrent_clients_each_get_their_own_rows_batched(server, digits):
    runs_before = server.metric("tuneline_batch_size_rows_count")
    rows_before = server.metric("tuneline_batch_size_rows_sum")
    seen, failures = _load(server.url + "/v2/models/mnist/infer", digits, {"v0002": digits.logits}, steps=4)
    assert failures == [] and len(seen) == CLIENTS * 4
    runs = server.metric("tuneline_batch_size_rows_count") - runs_before
    rows = server.metric("tuneline_batch_size_rows_sum") - rows_before
    assert rows == sum(1 + (c + s) % 3 for c in range(CLIENTS) for s in range(4))
    assert runs < CLIENTS * 4, f"{runs} session runs for {CLIENTS * 4} requests: no request shared a batch"


def keep_the_old_session(monkeypatch) -> None:
    """Mutant: a reload that loads and labels the new version but keeps answering with the first session loaded."""
    from tuneline.serving import model_holder

    real, first = model_holder.build_model, []

    def build_model(*args, **kwargs):
        model = real(*args, **kwargs)
        first.append(first[0] if first else model)
        return dataclasses.replace(model, session=first[0].session, runner=first[0].runner)

    monkeypatch.setattr(model_holder, "build_model", build_model)


MUTANT = pytest.mark.xfail(strict=True, raises=AssertionError, reason="the mutant must fail this test")


@pytest.mark.parametrize("mutant", [None, pytest.param(keep_the_old_session, marks=MUTANT, id="keeps-old-session")])
def test_promoting_a_champion_under_load_switches_the_logits_and_fails_no_request(tmp_path, onnx_model, other_model,
                                                                                  digits, mutant, monkeypatch):
    if mutant:
        mutant(monkeypatch)
    registry = make_registry(tmp_path, onnx_model)  # v0001 champion: the digits model
    references = {"v0001": digits.logits, "v0002": other_model.logits}
    with run_server(registry, reload_poll_s=0.05) as running:
        async def promote(seen: list) -> None:
            await asyncio.sleep(0.3)  # load is flowing
            version = register_version(registry, other_model.path)  # v0002: other weights
            set_alias(registry, version)
            mark = len(seen)
            deadline = asyncio.get_running_loop().time() + 20
            while "v0002" not in seen[mark:] and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # and a little more traffic on the new champion

        seen, failures = _load(running.url + "/v2/models/mnist/infer", digits, references, during=promote)
        assert failures == [], f"{len(failures)} of {len(seen)} answers wrong, e.g. {failures[:3]}"
        assert seen[0] == "v0001" and seen[-1] == "v0002", (seen[:3], seen[-3:])
        switch = seen.index("v0002")
        assert "v0001" not in seen[switch + CLIENTS:]  # after the swap only requests already queued finish on v0001
        assert np.allclose(_infer(running.url, digits)[1], other_model.logits[0], atol=1e-4)
        meta = httpx.get(running.url + "/v2/models/mnist").json()
        assert meta["parameters"]["version"] == "v0002" and meta["versions"] == ["v0002"]
        assert running.metric('tuneline_model_info{name="mnist",provider="CPUExecutionProvider",role="champion",'
                              'version="v0002"}') == 1
        assert running.metric('tuneline_model_info{name="mnist",provider="CPUExecutionProvider",role="champion",'
                              'version="v0001"}') == 0
        assert running.metric('tuneline_model_loads_total{result="success"}') == 2


def _infer(url: str, digits, path: str = "/v2/models/mnist/infer") -> tuple[str, np.ndarray]:
    """The version label and logits of one answer for digits.images[0]."""
    body = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                        "data": digits.images[0].ravel().tolist()}], "outputs": [{"name": "logits"}]}
    response = httpx.post(url + path, json=body)
    assert response.status_code == 200, response.text
    return response.json()["model_version"], _logits(response)[0]


def _infer_version(url: str, digits) -> str:
    return _infer(url, digits)[0]


def test_corrupt_model_wrong_checksum_and_corrupt_alias_keep_the_old_model(tmp_path, onnx_model, other_model,
                                                                           digits):
    registry = make_registry(tmp_path, onnx_model)  # v0001 champion
    data = onnx_model.read_bytes()
    with run_server(registry, reload_poll_s=0.05) as running:
        def failures(reason: str) -> float:
            return running.metric(f'tuneline_model_load_failures_total{{reason="{reason}"}}')

        # 1. a truncated model whose card matches it: the checksum passes, ONNX Runtime refuses it
        corrupt = register_version(registry, onnx_model, model_bytes=data[: len(data) // 2])
        set_alias(registry, corrupt)
        wait_until(lambda: failures("corrupt") == 1, what="corrupt load reported")
        assert _infer_version(running.url, digits) == "v0001"
        assert httpx.get(running.url + "/v2/health/ready").status_code == 200
        load = httpx.post(running.url + "/v2/repository/models/mnist/load")  # explicit reload: same refusal
        assert load.status_code == 400 and "ONNX Runtime cannot load or run it" in load.json()["error"]

        # 2. a whole file whose card carries another sha256
        wrong = register_version(registry, onnx_model, card_sha256="0" * 64)
        set_alias(registry, wrong)
        wait_until(lambda: failures("checksum") == 1, what="checksum failure reported")
        by_id = httpx.post(running.url + "/v2/repository/models/mnist/load", json={"parameters": {"version": wrong}})
        assert by_id.status_code == 400 and "does not match its card" in by_id.json()["error"]
        assert _infer_version(running.url, digits) == "v0001"

        # 3. a corrupt alias file
        set_alias(registry, "", text="{half a json")
        wait_until(lambda: failures("alias") == 1, what="corrupt alias reported")
        assert _infer_version(running.url, digits) == "v0001"

        assert np.allclose(_infer(running.url, digits)[1], digits.logits[0], atol=1e-4)  # and its weights

        # 4. a good version again (other weights): served, with its own logits
        good = register_version(registry, other_model.path)
        set_alias(registry, good)
        wait_until(lambda: _infer_version(running.url, digits) == good, what="good version served")
        assert np.allclose(_infer(running.url, digits)[1], other_model.logits[0], atol=1e-4)
        assert running.metric('tuneline_model_loads_total{result="failure"}') >= 4


def test_load_and_unload_versions_by_id(tmp_path, onnx_model, other_model, digits):
    registry = make_registry(tmp_path, other_model.path)  # v0001: other weights, not loaded once v0002 is champion
    set_alias(registry, register_version(registry, onnx_model))  # v0002 champion: the digits model
    with run_server(registry, reload_poll_s=0) as running:
        url = running.url
        body = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                            "data": digits.images[0].ravel().tolist()}]}
        assert httpx.post(url + "/v2/models/mnist/versions/v0001/infer", json=body).status_code == 503
        load = httpx.post(url + "/v2/repository/models/mnist/load", json={"parameters": {"version": "v0001"}})
        assert load.status_code == 200 and load.json()["role"] == "loaded"
        assert load.json()["provider"] == "CPUExecutionProvider"
        version, logits = _infer(url, digits, "/v2/models/mnist/versions/v0001/infer")
        assert version == "v0001" and np.allclose(logits, other_model.logits[0], atol=1e-4)  # v0001's own weights
        version, logits = _infer(url, digits)
        assert version == "v0002" and np.allclose(logits, digits.logits[0], atol=1e-4)  # the champion is unchanged
        assert httpx.get(url + "/v2/models/mnist").json()["versions"] == ["v0001", "v0002"]
        unload = httpx.post(url + "/v2/repository/models/mnist/unload", json={"parameters": {"version": "v0001"}})
        assert unload.status_code == 200
        assert httpx.post(url + "/v2/models/mnist/versions/v0001/infer", json=body).status_code == 503
        champion = httpx.post(url + "/v2/repository/models/mnist/unload", json={"parameters": {"version": "v0002"}})
        assert champion.status_code == 409 and "is the champion" in champion.json()["error"]
        missing = httpx.post(url + "/v2/repository/models/mnist/load", json={"parameters": {"version": "v0009"}})
        assert missing.status_code == 404
        assert httpx.post(url + "/v2/repository/models/cifar/load").status_code == 404
        assert httpx.post(url + "/v2/repository/models/mnist/load", content=b"[").status_code == 400
        reload = httpx.post(url + "/v2/repository/models/mnist/load")  # reload the champion: a fresh session
        assert reload.status_code == 200 and reload.json()["version"] == "v0002"


def test_not_ready_until_a_champion_exists(tmp_path, onnx_model, digits):
    registry = tmp_path / "registry"
    version = register_version(registry, onnx_model)  # registered, but no alias yet
    with run_server(registry, wait_ready=False, reload_poll_s=0.05) as running:
        ready = httpx.get(running.url + "/v2/health/ready")
        assert ready.status_code == 503 and "no champion alias" in ready.json()["error"]
        assert httpx.get(running.url + "/v2/health/live").status_code == 200
        infer = httpx.post(running.url + "/v2/models/mnist/infer", json={})
        assert infer.status_code == 503 and set(infer.json()) == {"error"}
        set_alias(registry, version)
        wait_until(lambda: httpx.get(running.url + "/v2/health/ready").status_code == 200, what="ready")
        assert _infer_version(running.url, digits) == version
    shutil.rmtree(registry)
