"""serve.capture (serving/capture.py): sampled requests written as JSONL in the contract format the pipeline's capture
data source reads, feedback labels beside them, rotation under a size cap; on a real server."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from tests.serving.conftest import SENTIMENT, register_models, run_server, wait_until
from tests.serving.registry_helper import make_registry
from tuneline.serving.capture import Capture

NAME = re.compile(r"^(capture|feedback)-\d{8}T\d{6}\.\d{6}Z-\d+\.jsonl$")


def _rows(folder: Path, kind: str) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob(f"{kind}-*.jsonl"))
            for line in path.read_text().splitlines()]


def _body(images: np.ndarray, request_id: str | None = None) -> bytes:
    doc = {"inputs": [{"name": "pixels", "shape": [len(images), 1, 28, 28], "datatype": "UINT8",
                       "data": images.ravel().tolist()}]}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc).encode()


def test_captured_requests_and_feedback_are_written_in_the_contract_format(tmp_path, onnx_model, digits):
    registry = make_registry(tmp_path, onnx_model, versions=2)
    folder = tmp_path / "capture"
    with run_server(registry, capture=True, capture_percent=100, capture_dir=str(folder)) as server, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        sent: dict[str, int] = {}  # captured id -> digit index
        for i in range(4):
            answer = client.post("/v2/models/mnist/infer", content=_body(digits.images[i:i + 1]))
            row_id = answer.headers["x-tuneline-request-id"]
            assert answer.json()["id"] == row_id  # the request gave no id: the captured one is the V2 id
            sent[row_id] = i
        three = client.post("/v2/models/mnist/infer", content=_body(digits.images[4:7], request_id="mine"))
        ids = three.headers["x-tuneline-request-id"].split(",")
        assert three.json()["id"] == "mine" and len(ids) == 3  # one id per row, in row order
        sent.update({row_id: 4 + k for k, row_id in enumerate(ids)})
        for row_id, i in sent.items():  # labels for every captured row: the true digit
            answer = client.post("/v2/feedback", json={"id": row_id, "label": int(digits.labels[i])})
            assert answer.status_code == 200 and answer.json() == {"id": row_id, "label": int(digits.labels[i])}
        for bad in (b"not json", b"[1, 2]", b'{"id": 3, "label": 1}', b'{"id": "abc", "label": "7"}',
                    b'{"id": "abc", "label": true}', b'{"id": "abc", "label": -1}', b'{"id": "abc"}',
                    b'{"id": "abc", "label": 1, "extra": 2}', b'{"id": "../x", "label": 1}'):
            answer = client.post("/v2/feedback", content=bad)
            assert answer.status_code == 400 and "feedback" in answer.json()["error"], bad
        wait_until(lambda: len(_rows(folder, "capture")) == 7 and len(_rows(folder, "feedback")) == 7,
                   what="capture and feedback written")
        live = client.get("/v2/live/mnist").json()["champion"]
    files = sorted(p.name for p in folder.iterdir())
    assert all(NAME.match(name) for name in files), files
    correct = 0
    for row in _rows(folder, "capture"):
        i = sent[row["id"]]
        assert uuid.UUID(hex=row["id"]).version == 4 and len(row["id"]) == 32
        assert row["time"].endswith("Z") and row["model"] == "mnist" and row["version"] == "v0002"
        assert row["modality"] == "image" and row["shape"] == [1, 28, 28]
        pixels = np.asarray(row["input"], dtype=np.float32)
        assert pixels.shape == (1, 28, 28) and np.array_equal(pixels[0], digits.images[i].astype(np.float32))
        assert row["class"] == int(digits.classes[i])
        probabilities = np.exp(digits.logits[i] - digits.logits[i].max())
        assert row["probability"] == pytest.approx(float(probabilities.max() / probabilities.sum()), abs=1e-5)
        correct += row["class"] == int(digits.labels[i])
    assert {f["id"]: f["label"] for f in _rows(folder, "feedback")} == {k: int(digits.labels[i]) for k, i in sent.items()}
    assert live["labelled"] == 7 and live["labelled_accuracy"] == pytest.approx(correct / 7)


def test_a_text_model_captures_the_string_it_was_sent(tmp_path, text_model):
    registry = register_models(tmp_path / "registry", {SENTIMENT: text_model})
    folder = tmp_path / "capture"
    text = "a gorgeous, witty, seductive movie"
    with run_server(registry, capture=True, capture_percent=100, capture_dir=str(folder)) as server:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        answer = httpx.post(f"{server.url}/v2/models/{SENTIMENT}/infer", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        wait_until(lambda: len(_rows(folder, "capture")) == 1, what="the text captured")
    (row,) = _rows(folder, "capture")
    assert row["input"] == text and row["modality"] == "text" and row["id"] == answer.headers["x-tuneline-request-id"]


def test_without_capture_nothing_is_captured_and_feedback_is_404(server, digits):
    answer = httpx.post(f"{server.url}/v2/models/mnist/infer", content=_body(digits.images[:1]))
    assert "x-tuneline-request-id" not in answer.headers and "id" not in answer.json()
    refused = httpx.post(f"{server.url}/v2/feedback", json={"id": "ab" * 16, "label": 1})
    assert refused.status_code == 404 and "serve.capture" in refused.json()["error"]


def test_files_rotate_at_a_tenth_of_the_cap_and_the_oldest_go_beyond_it(tmp_path):
    folder = tmp_path / "capture"
    capture = Capture(folder, percent=100, max_mb=0.2)  # files of 20 kB, 200 kB in all
    model = SimpleNamespace(name="speech", version="v0001", modality="audio")
    samples = np.linspace(-1, 1, 400, dtype=np.float32)[None]  # ~8 kB per captured row

    async def capture_rows(n: int) -> list[str]:
        ids = []
        for _ in range(n):
            ids += capture.record(model, samples, None, np.array([[0.25, 0.75]]))
            await capture.flush()
        return ids

    ids = asyncio.run(capture_rows(120))
    files = sorted(folder.iterdir())
    sizes = [p.stat().st_size for p in files]
    assert len(files) > 5 and sum(sizes) <= 200_000 + max(sizes)  # the cap, give or take the file being written
    assert max(sizes) < 20_000 + 10_000  # closed once past a tenth of the cap (one more row at most)
    rows = [json.loads(line) for p in files for line in p.read_text().splitlines()]  # whole lines only
    assert [r["id"] for r in rows] == ids[-len(rows):]  # the newest kept, the oldest deleted
    assert rows[0]["shape"] == [400] and rows[0]["input"][0] == -1.0 and rows[0]["class"] == 1
    assert rows[0]["probability"] == 0.75
