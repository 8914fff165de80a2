"""Conformance (issue 16): the documented bad-input table, row by row, and malformed requests batched with good ones.

The table is parsed from docs/serving.md, so the doc and the server cannot drift apart. The overlap test is
Triton's test_shape_overlapped idea: good and malformed requests land in one batch window; the good ones'
answers must equal ONNX Runtime's on the model file, whatever else shared the window.
"""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import run_server
from tests.serving.registry_helper import make_registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
TABLE_HEADING = "### Bad input, row by row"


def _doc_rows() -> list[dict[str, str]]:
    """The rows of the bad-input table in docs/serving.md, as {column: cell without backticks}."""
    text = DOC.read_text()
    assert TABLE_HEADING in text, f"{DOC}: no '{TABLE_HEADING}' section"
    block: list[str] = []
    for line in text.split(TABLE_HEADING, 1)[1].splitlines():  # the first table after the heading
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    header, _, *rows = ([cell.strip() for cell in line.strip().strip("|").split("|")] for line in block)
    return [{name: cell.strip().strip("`") for name, cell in zip(header, row, strict=True)} for row in rows]


ROWS = _doc_rows()


def _image(digit: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format=fmt)
    return buffer.getvalue()


def _wavs() -> dict[bytes, bytes]:
    """The table's WAV tags: a 31 s clip at 8 kHz, a WAV without frames, a WAV whose `fmt ` chunk is renamed."""
    from tests.serving.speech_text_models import tone, wav_bytes

    bad_header = bytearray(wav_bytes(tone(300, 0.1, 8000), 8000))
    assert bad_header[12:16] == b"fmt "
    bad_header[12:16] = b"junk"
    return {b"<WAV 31 s>": wav_bytes(tone(300, 31, 8000), 8000), b"<WAV 0 frames>": wav_bytes(np.zeros(0), 8000),
            b"<WAV bad header>": bytes(bad_header)}


def _expand(body: str, digit: np.ndarray) -> bytes:
    """`V ×N` -> N copies of V; <PNG>/<WEBP> -> a real digit in that format; <WAV …> -> those clips; <TEXT n> -> n
    bytes of text; <BYTES ff fe> -> one V2 BYTES element holding those bytes; <ff fe> -> those bytes."""
    body = re.sub(r"([^\s\[,]+) ×(\d+)", lambda m: ", ".join([m.group(1)] * int(m.group(2))), body)
    data = body.encode()
    for tag, fmt in ((b"<PNG>", "PNG"), (b"<WEBP>", "WEBP")):
        data = data.replace(tag, _image(digit, fmt))
    if b"<WAV " in data:
        for tag, clip in _wavs().items():
            data = data.replace(tag, clip)
    data = re.sub(rb"<TEXT (\d+)>", lambda m: b"a" * int(m.group(1)), data)
    def element(match: re.Match) -> bytes:
        raw = bytes.fromhex(match.group(1).decode())
        return len(raw).to_bytes(4, "little") + raw

    data = re.sub(rb"<BYTES ((?:[0-9a-f]{2} ?)+)>", element, data)
    return re.sub(rb"<((?:[0-9a-f]{2} ?)+)>", lambda m: bytes.fromhex(m.group(1).decode()), data)


def _send(url: str, row: dict[str, str], digit: np.ndarray) -> httpx.Response:
    headers = dict(h.split(": ", 1) for h in row["headers"].split("; ") if h)
    body = row["body"]
    if body.startswith("multipart "):
        field, _, content = body[len("multipart "):].partition("=")
        files = {field: ("upload", _expand(content, digit), "application/octet-stream")}
        return httpx.post(url + row["path"], files=files, headers=headers)
    return httpx.post(url + row["path"], content=_expand(body, digit), headers=headers)


def _for_speech_or_text(row: dict[str, str]) -> bool:
    return any(name in row["path"] for name in ("/speech", "/sentiment", "model=speech", "model=sentiment"))


@pytest.mark.parametrize("row", ROWS, ids=[row["bad input"] for row in ROWS])
def test_documented_bad_input_table(request, digits, row):
    # The MNIST rows go to the MNIST server; the speech and text rows to the server with those models.
    server = request.getfixturevalue("speech_text_server" if _for_speech_or_text(row) else "server")
    response = _send(server.url, row, digits.images[0])
    assert response.status_code == int(row["status"]), (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert row["the error says"] in error, error
    assert "\n" not in error


def test_the_table_covers_the_bad_input_the_issue_names():
    names = {row["bad input"] for row in ROWS}
    assert {"a shape past int64", "booleans as pixels", "a WEBP image", "not an image"} <= names
    assert len(ROWS) >= 20
    # The speech and text inputs: empty and oversized text, invalid UTF-8, WAVs without frames or with a corrupt
    # header, a clip longer than serve.max_audio_s, each over V2 or /classify.
    assert {"text model: an empty text", "text model: a text over 64 KiB", "text model: invalid UTF-8 (binary BYTES)",
            "a WAV with no frames", "a corrupt WAV header", "a clip longer than serve.max_audio_s",
            "speech model: a clip longer than serve.max_audio_s", "empty text", "text not UTF-8"} <= names


def _json_request(rows: np.ndarray, flat: bool, datatype: str) -> dict:
    shape = [len(rows), 784] if flat else [len(rows), 1, 28, 28]
    return {"inputs": [{"name": "pixels", "shape": shape, "datatype": datatype, "data": rows.ravel().tolist()}]}


BAD_BODIES = [  # each passes the HTTP layer and fails inside the protocol checks, while good requests are queued
    {"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "UINT8", "data": [0] * 784}]},
    {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 27], "datatype": "FP32", "data": [0.0] * 756}]},
    {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [300.0] * 784}]},
    {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [True] * 784}]},
    {"inputs": [{"name": "pixels", "shape": [2**62, 784], "datatype": "FP32", "data": [0.0] * 784}]},
    {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}],
     "outputs": [{"name": "embedding"}]},
]


def test_malformed_requests_batched_with_good_ones_do_not_change_their_answers(tmp_path, onnx_model, digits):
    # A 300 ms batch window and 64 rows a batch: the requests fired together share batches.
    registry = make_registry(tmp_path, onnx_model)
    with run_server(registry, max_queue_delay_us=300_000, max_batch_size=64) as running:
        good = []  # (first row, rows, flat, datatype): 1-3 rows each, both layouts, both datatypes
        start = 0
        for i in range(16):
            n = 1 + i % 3
            good.append((start, n, i % 2 == 0, ("UINT8", "FP32")[i // 2 % 2]))
            start += n
        requests = [("good", i, _json_request(digits.images[s:s + n], flat, dt)) for i, (s, n, flat, dt) in enumerate(good)]
        requests += [("bad", i, body) for i, body in enumerate(BAD_BODIES)]
        requests.sort(key=lambda r: (r[1] * 7) % 5)  # interleave good and bad
        answers: dict[tuple[str, int], httpx.Response] = {}
        barrier = threading.Barrier(len(requests))

        def fire(kind: str, i: int, body: dict) -> None:
            content = json.dumps(body).encode()
            with httpx.Client(timeout=20) as client:
                barrier.wait()
                answers[kind, i] = client.post(running.url + "/v2/models/mnist/infer", content=content)

        threads = [threading.Thread(target=fire, args=r) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        batches = running.metric('tuneline_batch_size_rows_count{model="mnist"')
        for i in range(len(BAD_BODIES)):
            assert answers["bad", i].status_code == 400, answers["bad", i].text
        for i, (s, n, _flat, _dt) in enumerate(good):
            response = answers["good", i]
            assert response.status_code == 200, response.text
            outputs = {o["name"]: o for o in response.json()["outputs"]}
            logits = np.asarray(outputs["logits"]["data"], dtype=np.float32).reshape(n, -1)
            np.testing.assert_allclose(logits, digits.logits[s:s + n], rtol=1e-4, atol=1e-4)
            assert outputs["class"]["data"] == digits.classes[s:s + n].tolist()
        warm_up_batches = 0  # warm-up runs directly, not through the batcher
        assert batches - warm_up_batches < len(good) / 2, f"{batches} batches for {len(good)} good requests: not batched"


def test_openapi_describes_what_the_server_answers(server):
    """Issue 16 defect 4: empty bodies, /metrics as text, /classify's one PNG/JPEG file, repository statuses."""
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready"):
        assert "content" not in paths[path]["get"]["responses"]["200"], path
        assert httpx.get(server.url + path.replace("{name}", "mnist")).content == b""
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert httpx.get(server.url + "/metrics").headers["content-type"].startswith("text/plain")
    form = paths["/classify"]["post"]["requestBody"]["content"]
    media = {"image/png", "image/jpeg", "audio/wav", "audio/flac", "audio/ogg", "text/plain"}
    assert set(form) == {"multipart/form-data", *media}
    assert form["multipart/form-data"]["schema"]["additionalProperties"] is False
    assert set(form["multipart/form-data"]["encoding"]["file"]["contentType"].split(", ")) == media
    assert {"413", "415"} <= set(paths["/classify"]["post"]["responses"])
    for path in ("/v2/repository/models/{name}/load", "/v2/repository/models/{name}/unload"):
        assert {"400", "401", "403", "404"} <= set(paths[path]["post"]["responses"]), path
    assert not any("422" in op["responses"] for ops in paths.values() for op in ops.values())
