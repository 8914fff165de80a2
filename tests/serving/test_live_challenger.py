"""serve.challenger: the registry's challenger alias on live traffic (serving/challenger.py), and the live numbers of
each version at GET /v2/live (serving/live.py), on a real server with two really different models: v0001 (champion)
is the exported CNN, v0002 (challenger) the same graph with other weights, so every answer's logits say which one
ran it, whatever its labels claim.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.serving.conftest import run_server, wait_until
from tests.serving.registry_helper import register_version, set_alias
from tuneline.serving.challenger import Shadow, key_point, routes_to_challenger

INFER = "/v2/models/mnist/infer"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, onnx_model, other_model):
    """v0001 = onnx_model (champion), v0002 = other_model (challenger)."""
    registry = tmp_path_factory.mktemp("challenger") / "registry"
    register_version(registry, onnx_model)
    register_version(registry, other_model.path)
    set_alias(registry, "v0001", "champion")
    set_alias(registry, "v0002", "challenger")
    return registry


def _body(image: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                   "data": image.ravel().tolist()}], "outputs": [{"name": "logits"}]}).encode()


def _logits(answer: httpx.Response) -> np.ndarray:
    return np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32)


def _both_loaded(server) -> None:
    slot = server.holder.slots["mnist"]
    wait_until(lambda: slot.champion is not None and slot.challenger is not None, what="champion and challenger")
    assert (slot.champion.version, slot.challenger.version) == ("v0001", "v0002")


def test_canary_answers_its_share_from_the_challenger_sticky_per_client_key(two_versions, digits, other_model):
    with run_server(two_versions, challenger="canary", canary_percent=20) as server:
        _both_loaded(server)
        dataplane = server.app.state.dataplane
        # The routing function itself, 10,000 times: keyless (random) and with 10,000 different client keys.
        keyless = Counter(dataplane.route("mnist").role for _ in range(10_000))
        keyed = Counter(dataplane.route("mnist", key=f"client-{i}").role for i in range(10_000))
        for counts in (keyless, keyed):
            assert abs(counts["challenger"] / 10_000 - 0.20) <= 0.02, counts
        for i in range(50):  # the same key, the same version, every time
            assert len({dataplane.route("mnist", key=f"client-{i}").model.version for _ in range(20)}) == 1
        assert dataplane.route("mnist", version="v0001").role == "champion"  # a version asked for is not re-routed

        versions: Counter[str] = Counter()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            # End to end, 300 clients with their own keys: each answer says who answered it, that is exactly the
            # version its key's hash routes to, and its logits are that version's. (Exact, not a share within
            # bounds: 300 random draws left a ±8-point band that one CI run in ~10,000 falls out of.)
            for i in range(300):
                image, key = i % len(digits.images), f"e2e-{i}"
                answer = client.post(INFER, content=_body(digits.images[image]), headers={"x-tuneline-client": key})
                assert answer.status_code == 200, answer.text
                version = answer.headers["x-tuneline-version"]
                assert answer.json()["model_version"] == version
                assert version == ("v0002" if routes_to_challenger(20, key) else "v0001"), (key, version)
                expected = other_model.logits[image] if version == "v0002" else digits.logits[image]
                np.testing.assert_allclose(_logits(answer), expected, atol=1e-3)
                versions[version] += 1
            assert 0 < versions["v0002"] < 300, versions  # both versions really answered
            for key in ("alice", "bob", "carol", "dave"):
                sticky = {client.post(INFER, content=_body(digits.images[0]), headers={"x-tuneline-client": key})
                          .headers["x-tuneline-version"] for _ in range(15)}
                expected = "v0002" if routes_to_challenger(20, key) else "v0001"
                assert sticky == {expected}, (key, sticky)
            picture = client.post("/classify", content=_png(digits.images[0]), headers={"content-type": "image/png",
                                                                                        "x-tuneline-client": "alice"})
            assert picture.headers["x-tuneline-version"] == picture.json()["model_version"]
            live = client.get("/v2/live/mnist").json()
        assert live["mode"] == "canary" and live["champion"]["version"] == "v0001"
        assert live["challenger"]["version"] == "v0002"
        assert live["champion"]["requests"] + live["challenger"]["requests"] == 300 + 4 * 15 + 1
        assert live["challenger"]["requests"] >= versions["v0002"] and live["challenger"]["errors"] == 0
        assert live["challenger"]["latency_ms"]["p99"] > 0 and 0 < live["challenger"]["mean_confidence"] <= 1
        assert sum(live["champion"]["class_counts"].values()) == live["champion"]["requests"]
        assert server.metric('tuneline_live_requests_total{model="mnist",role="challenger",version="v0002"}') == \
            live["challenger"]["requests"]


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_canary_choice_is_by_key_hash_and_the_share_follows_the_percent():
    assert routes_to_challenger(0, "anyone") is False and routes_to_challenger(100, None) is True
    points = [key_point(f"user-{i}") for i in range(10_000)]
    assert all(0 <= p < 100 for p in points) and abs(np.mean(np.asarray(points) < 20) - 0.2) < 0.02
    assert key_point("user-7") == key_point("user-7")  # stable (not Python's salted hash())


def test_grpc_reads_the_client_key_and_says_which_version_answered(two_versions, digits):
    with run_server(two_versions, challenger="canary", canary_percent=50, grpc_port=0) as server:
        _both_loaded(server)
        port = server.app.state.grpc_port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for key in ("alice", "bob", "carol"):
                seen = set()
                for _ in range(5):
                    pixels = digits.images[1][None, None]
                    request = service_pb2.ModelInferRequest(model_name="mnist", raw_input_contents=[pixels.tobytes()])
                    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
                    answer, call = stub.ModelInfer.with_call(request, metadata=[("x-tuneline-client", key)], timeout=10)
                    trailing = dict(call.trailing_metadata())
                    assert trailing["x-tuneline-version"] == answer.model_version
                    seen.add(answer.model_version)
                assert seen == {"v0002" if routes_to_challenger(50, key) else "v0001"}, (key, seen)


def test_shadow_runs_the_challenger_off_the_response_path_and_reports_agreement(two_versions, digits, other_model):
    n = 200
    with run_server(two_versions, challenger="shadow", shadow_percent=100) as server:
        _both_loaded(server)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i in range(n):
                answer = client.post(INFER, content=_body(digits.images[i]))
                assert answer.headers["x-tuneline-version"] == "v0001"  # the champion answers every request
                np.testing.assert_allclose(_logits(answer), digits.logits[i], atol=1e-3)
            wait_until(lambda: client.get("/v2/live/mnist").json()["challenger"]["compared"] == n,
                       what="every shadow run compared")
            live = client.get("/v2/live/mnist").json()
        agree = float(np.mean(digits.classes[:n] == other_model.logits[:n].argmax(1)))
        challenger = live["challenger"]
        assert live["mode"] == "shadow" and challenger["version"] == "v0002"
        assert challenger["agreement"] == pytest.approx(agree, abs=1e-6) and challenger["dropped"] == 0
        assert challenger["requests"] == n and live["champion"]["requests"] == n
        assert agree < 1.0  # the two models really differ somewhere, so agreement is measured, not assumed
        assert server.metric('tuneline_shadow_compared_total{model="mnist",version="v0002"}') == n
        assert server.metric('tuneline_shadow_agreed_total{model="mnist",version="v0002"}') == round(agree * n)


def test_a_full_shadow_queue_drops_and_counts_instead_of_waiting():
    dropped = []

    async def offer_three():
        shadow = Shadow(size=2, percent=10, on_result=lambda *a: None, on_drop=dropped.append)
        return [shadow.offer("challenger", np.zeros((1, 4)), np.zeros(1)) for _ in range(3)]

    assert asyncio.run(offer_three()) == [True, True, False] and dropped == ["challenger"]
    shadow = Shadow(size=2, percent=10, on_result=None, on_drop=None)
    assert abs(sum(shadow.sampled() for _ in range(10_000)) / 10_000 - 0.10) < 0.015


class _SlowChallenger:
    """A challenger whose session takes 0.3 s a run; row i's class is int(row value) % 2."""

    name, version = "mnist", "v0002"

    def __init__(self):
        self.runs: list[int] = []
        self.threads: set[int] = set()

    def run(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        self.threads.add(threading.get_ident())
        self.runs.append(len(rows))
        time.sleep(0.3)
        probabilities = np.full((len(rows), 2), 0.1)
        probabilities[np.arange(len(rows)), rows[:, 0].astype(int) % 2] = 0.9
        return {"probabilities": probabilities}


def test_the_shadow_runs_waiting_requests_together_in_its_own_thread_while_the_loop_keeps_going():
    async def scenario():
        delivered = []
        shadow = Shadow(size=16, percent=100, on_drop=None, on_result=lambda model, rows, outputs, seconds,
                        champion: delivered.append((threading.get_ident(), outputs["probabilities"].argmax(1).tolist(),
                                                    champion.tolist(), seconds)))
        shadow.start()
        challenger = _SlowChallenger()
        for i in range(5):  # offered in the same moment: one run of 5 rows
            assert shadow.offer(challenger, np.full((1, 4), float(i)), np.array([i % 2]))
        ticks, started = 0, time.perf_counter()
        while len(delivered) < 5:  # the event loop keeps turning while the challenger's 0.3 s run goes on
            await asyncio.sleep(0.01)
            ticks += 1
            assert time.perf_counter() - started < 10, "the shadow results never came back"
        await shadow.stop()
        return delivered, challenger, ticks, threading.get_ident()

    delivered, challenger, ticks, loop_thread = asyncio.run(scenario())
    assert challenger.runs == [5] and loop_thread not in challenger.threads
    assert ticks >= 15
    assert all(thread == loop_thread for thread, *_ in delivered)  # live numbers are only touched on the loop
    assert [classes for _, classes, _, _ in delivered] == [champion for _, _, champion, _ in delivered] == \
        [[i % 2] for i in range(5)]  # each request gets its own rows' answers back
    assert all(seconds >= 0.3 for *_, seconds in delivered)
