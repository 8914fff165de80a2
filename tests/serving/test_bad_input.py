"""Inputs that once got a 500 (or were silently accepted): each is now a 400 with a one-line JSON error.

Issue 16, defects 1, 2 and 6, on a real server with the real exported MNIST model.
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

INFER = "/v2/models/mnist/infer"


def _post_binary(url: str, header: dict, data: bytes) -> httpx.Response:
    head = json.dumps(header).encode()
    return httpx.post(url, content=head + data, headers={"inference-header-content-length": str(len(head)),
                                                         "content-type": "application/octet-stream"})


def _assert_400(response: httpx.Response, *fragments: str) -> str:
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and "\n" not in error
    for fragment in fragments:
        assert fragment in error, error
    return error


# [2**60 + 1, 784] has (2**60 + 1) * 784 elements, which is 784 modulo 2**64: int64 arithmetic saw a match with
# 784 values and numpy's reshape then failed (500). [2**62, 784] wraps to exactly 0 ("0 elements").
HUGE_SHAPES = [[2**60 + 1, 784], [2**62, 784], [2**62, 1, 28, 28], [2**63, 784]]  # JSON parsers read 2**64+ as floats


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=str)
def test_shapes_whose_element_count_overflows_int64_are_400(server, shape):
    body = {"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32", "data": [0.0] * 784}]}
    error = _assert_400(httpx.post(server.url + INFER, json=body), "elements")
    assert f"{shape[0] * 784:,}".replace(",", "") in error.replace(",", "")  # the true count, not a wrapped one
    header = {"inputs": [{"name": "pixels", "shape": shape, "datatype": "UINT8",
                          "parameters": {"binary_data_size": 784}}]}
    _assert_400(_post_binary(server.url + INFER, header, bytes(784)), "elements")


def test_json_booleans_are_not_pixels(server):
    flat = [True, False] * 392
    for data, shape in ((flat, [1, 784]), ([[[flat[:28]] * 28]], [1, 1, 28, 28]), ([0.0] * 783 + [False], [1, 784])):
        for datatype in ("FP32", "UINT8"):
            body = {"inputs": [{"name": "pixels", "shape": shape, "datatype": datatype, "data": data}]}
            _assert_400(httpx.post(server.url + INFER, json=body), "true/false")
    ones = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [1] * 784}]}
    assert httpx.post(server.url + INFER, json=ones).status_code == 200  # the number 1 is still a pixel


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_malformed_png_uploads_are_400(server, digits):
    good = _png(digits.images[0])
    assert good[8:16] == b"\x00\x00\x00\x0dIHDR"  # the first chunk: its 4-byte length, then its type
    short_ihdr = bytearray(good)
    short_ihdr[11] = 5  # Pillow: ValueError "Truncated IHDR chunk"
    broken_chunk = bytearray(good)
    broken_chunk[37:41] = b")Z\x03\xed"  # the second chunk's type: Pillow raises SyntaxError "broken PNG file"
    for data in (bytes(short_ihdr), bytes(broken_chunk)):
        response = httpx.post(server.url + "/classify", files={"file": ("x.png", data, "image/png")})
        _assert_400(response, "not a readable PNG or JPEG")
        raw = httpx.post(server.url + "/classify", content=data, headers={"content-type": "image/png"})
        _assert_400(raw, "not a readable PNG or JPEG")
