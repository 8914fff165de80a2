"""Single-client latency (issue 16): a request alone at the server is never held for the batch window.

The window is set to 200 ms, so a held request would be obvious against loopback timing noise; concurrent
requests must still share session runs.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

from tests.serving.conftest import run_server
from tests.serving.registry_helper import make_registry

WINDOW_S = 0.2  # serve.max_queue_delay_us below


def _body(image: np.ndarray) -> dict:
    return {"inputs": [{"name": "pixels", "shape": [1, 1, *image.shape], "datatype": "UINT8",
                        "data": image.ravel().tolist()}]}


def _predicted(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(np.argmax(response.json()["outputs"][0]["data"]))


def test_a_lone_request_skips_the_batch_window_while_concurrent_ones_batch(tmp_path, onnx_model, digits):
    registry = make_registry(tmp_path, onnx_model)
    with run_server(registry, max_queue_delay_us=int(WINDOW_S * 1e6)) as running:
        url = running.url + "/v2/models/mnist/infer"
        runs_before = running.metric("tuneline_batch_size_rows_count")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(url, json=_body(digits.images[i])) for i in range(32)))

        answers = asyncio.run(burst())
        assert [_predicted(r) for r in answers] == list(digits.classes[:32])
        runs = running.metric("tuneline_batch_size_rows_count") - runs_before
        assert runs < 32, f"{runs} session runs for 32 concurrent requests: none shared a batch"

        with httpx.Client(timeout=30) as client:  # one client, one request at a time, right after the burst
            client.post(url, json=_body(digits.images[0]))  # connection set up outside the timing
            latencies = []
            for i in range(5):
                started = time.perf_counter()
                assert _predicted(client.post(url, json=_body(digits.images[i]))) == digits.classes[i]
                latencies.append(time.perf_counter() - started)
        assert max(latencies) < WINDOW_S / 2, f"lone requests took {latencies} s: held for the batch window"
