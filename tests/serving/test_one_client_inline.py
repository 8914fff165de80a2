"""A quick lone request runs on the event loop only when the traffic is one client's (serving/batcher.py,
middleware.InFlight.one_client), on a real server: one keep-alive client gets the loop, while requests that arrive
one at a time over many connections (a lull in many clients' traffic looks the same to in_flight) run in the
ONNX Runtime thread. Runs on the loop amid many clients' traffic gave 64-connection p99s of 110-490 ms after a
one-client period (docs/benchmarks.md)."""

from __future__ import annotations

import threading

import httpx
import numpy as np

from tests.serving.conftest import run_server
from tuneline.serving.middleware import ONE_CLIENT_SHARE, ONE_CLIENT_WINDOW

BODY = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}


def test_only_one_clients_traffic_runs_lone_requests_on_the_event_loop(registry, monkeypatch):
    # The connection rule alone: a run counts as quick whatever it took (on a loaded machine one run can pass the
    # 0.5 ms bar and send the next ones to the thread; the timing rule has its own test in test_units.py).
    monkeypatch.setattr("tuneline.serving.batcher.INLINE_RUN_S", 1.0)
    with run_server(registry) as server:
        url = f"{server.url}/v2/models/mnist/infer"
        batcher = server.holder.slots["mnist"].champion.batcher
        threads: list[str] = []
        run = batcher.run

        def spy(rows: np.ndarray):  # the real run, and which thread ran it
            threads.append(threading.current_thread().name)
            return run(rows)

        batcher.run = spy
        with httpx.Client() as client:  # one client, one keep-alive connection
            for _ in range(ONE_CLIENT_WINDOW + 20):
                assert client.post(url, json=BODY).status_code == 200
            assert threads[-10:] == [server.thread.name] * 10, threads  # the loop's thread, once it is one client

            threads.clear()
            for i in range(40):  # the same client, with another client's request now and then (a monitor)
                if i % 10 == 5:
                    with httpx.Client() as monitor:
                        assert monitor.post(url, json=BODY).status_code == 200
                assert client.post(url, json=BODY).status_code == 200
            assert threads.count(server.thread.name) >= 40, threads

        threads.clear()
        for _ in range(ONE_CLIENT_WINDOW + 20):  # one request at a time, each over a connection of its own
            with httpx.Client() as client:
                assert client.post(url, json=BODY).status_code == 200
        settled = threads[ONE_CLIENT_WINDOW - ONE_CLIENT_SHARE + 1:]  # once the last client's share is under the bar
        assert settled and all(name.startswith("onnxruntime") for name in settled), threads

        threads.clear()
        with httpx.Client() as first, httpx.Client() as second:  # two keep-alive clients taking turns
            for _ in range(ONE_CLIENT_WINDOW + 20):
                assert first.post(url, json=BODY).status_code == 200
                assert second.post(url, json=BODY).status_code == 200
        assert threads and all(name.startswith("onnxruntime") for name in threads), threads
