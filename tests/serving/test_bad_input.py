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


# --- speech and text models: bad text, bad clips (a 4xx naming the problem, never a 5xx) ---------------------------


def _bytes_tensor(*elements: bytes) -> bytes:
    """The V2 BYTES encoding: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def _assert_status(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert "\n" not in error
    for fragment in fragments:
        assert fragment in error, error
    return error


TEXT_INFER = "/v2/models/sentiment/infer"
SPEECH_INFER = "/v2/models/speech/infer"


@pytest.mark.parametrize("text, status, says", [
    ("", 400, "row 1: empty"), ("   \n\t", 400, "row 1: empty"), ("a" * 65537, 413, "at most 65536 bytes")],
    ids=["empty", "blank", "oversized"])
def test_bad_text_rows_over_v2(speech_text_server, text, status, says):
    url = speech_text_server.url
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["fine", text]}]}
    _assert_status(httpx.post(url + TEXT_INFER, json=body), status, says)
    header = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(_bytes_tensor(b"fine", text.encode()))}}]}
    _assert_status(_post_binary(url + TEXT_INFER, header, _bytes_tensor(b"fine", text.encode())), status, says)


def test_invalid_utf8_and_malformed_bytes_tensors_are_400(speech_text_server):
    url = speech_text_server.url

    def send(data: bytes, count: int = 1) -> httpx.Response:
        header = {"inputs": [{"name": "text", "shape": [count], "datatype": "BYTES",
                              "parameters": {"binary_data_size": len(data)}}]}
        return _post_binary(url + TEXT_INFER, header, data)

    _assert_status(send(_bytes_tensor(b"ok", b"caf\xe9"), 2), 400, "row 1: not valid UTF-8")
    _assert_status(send(_bytes_tensor(b"ok", b"more")), 400, "8 bytes left after the 1 BYTES element(s)")
    _assert_status(send(_bytes_tensor(b"caf\xe9 au lait")), 400, "row 0: not valid UTF-8 (byte 3)")
    _assert_status(send(b"\x09\x00\x00\x00abc"), 400, "declares 9 bytes but only 3 follow")
    _assert_status(send(b"\x01\x00"), 400, "BYTES data ends at element 0")
    numbers = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [7]}]}
    _assert_status(httpx.post(url + TEXT_INFER, json=numbers), 400, "row 0: expected a string")
    fp32 = {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [0.5]}]}
    _assert_status(httpx.post(url + TEXT_INFER, json=fp32), 400, "datatype 'FP32' is not accepted: use BYTES")


def test_bad_text_uploads_to_classify(speech_text_server):
    url = speech_text_server.url + "/classify?model=sentiment"
    plain = {"content-type": "text/plain"}
    _assert_status(httpx.post(url, content=b"", headers=plain), 400, "empty")
    _assert_status(httpx.post(url, content=b"\xff\xfe", headers=plain), 400, "not valid UTF-8")
    _assert_status(httpx.post(url, content=b"a" * 65537, headers=plain), 413, "at most 65536 bytes")
    _assert_status(httpx.post(url, files={"file": ("x.txt", b"bad \xc3")}), 400, "not valid UTF-8")
    _assert_status(httpx.post(url, content=b"fine", headers={"content-type": "text/plain; charset=latin-1"}), 415,
                   "send UTF-8")
    _assert_status(httpx.post(url, content=b"\x89PNG", headers={"content-type": "image/png"}), 415,
                   "classifies UTF-8 text")


def _wav(frames: int, rate: int = 8000) -> bytes:
    from tests.serving.speech_text_models import tone, wav_bytes

    return wav_bytes(tone(300, frames / rate, rate), rate)


def test_bad_clips_to_classify(speech_text_server):
    url = speech_text_server.url + "/classify?model=speech"
    wav = {"content-type": "audio/wav"}
    _assert_status(httpx.post(url, content=_wav(0), headers=wav), 400, "no audio frames")
    corrupt = bytearray(_wav(800))
    corrupt[12:16] = b"junk"  # the fmt chunk's name: no format, no rate, no channels
    _assert_status(httpx.post(url, content=bytes(corrupt), headers=wav), 400, "not a readable WAV, FLAC or OGG")
    _assert_status(httpx.post(url, files={"file": ("x.wav", b"RIFF\x00\x00")}), 400, "not a readable WAV")
    _assert_status(httpx.post(url, content=b"", headers=wav), 400, "empty")
    long_clip = _wav(31 * 8000)  # serve.max_audio_s is 30 s
    _assert_status(httpx.post(url, content=long_clip, headers=wav), 413, "31.0 s", "up to 30 s")
    _assert_status(httpx.post(url, files={"file": ("x.wav", long_clip)}), 413, "serve.max_audio_s")
    _assert_status(httpx.post(url, content=b"hello", headers={"content-type": "text/plain"}), 415,
                   "classifies a WAV, FLAC or OGG clip")


def test_bad_audio_rows_over_v2(speech_text_server):
    url = speech_text_server.url + SPEECH_INFER

    def body(shape, data):
        return {"inputs": [{"name": "samples", "shape": shape, "datatype": "FP32", "data": data}]}

    _assert_status(httpx.post(url, json=body([1, 240001], [0.0] * 240001)), 413, "at most 240000 samples",
                   "serve.max_audio_s")
    header = {"inputs": [{"name": "samples", "shape": [1, 240001], "datatype": "FP32",
                          "parameters": {"binary_data_size": 4 * 240001}}]}
    _assert_status(_post_binary(url, header, bytes(4 * 240001)), 413, "at most 240000 samples")
    _assert_status(httpx.post(url, json=body([1, 1500], [1000.0] * 1500)), 400, "values span [1000, 1000]",
                   "in [-1, 1]")
    _assert_status(httpx.post(url, json=body([1, 1, 2000], [0.0] * 2000)), 400, "is not accepted: expected [N, L]")
    _assert_status(httpx.post(url, json=body([1, 0], [])), 400, "is not accepted")
    _assert_status(httpx.post(url, content=b'{"inputs": [{"name": "samples", "shape": [1, 2], "datatype": "FP32", '
                                           b'"data": [NaN, 0]}]}'), 400, "not valid JSON")
    header = {"inputs": [{"name": "samples", "shape": [1, 2], "datatype": "FP32",
                          "parameters": {"binary_data_size": 8}}]}
    _assert_status(_post_binary(url, header, np.array([np.nan, 0], "<f4").tobytes()), 400, "NaN")
    uint8 = {"inputs": [{"name": "samples", "shape": [1, 2], "datatype": "UINT8", "data": [0, 1]}]}
    _assert_status(httpx.post(url, json=uint8), 400, "datatype 'UINT8' is not accepted: use FP32")


def test_bad_speech_and_text_input_over_grpc_is_invalid_argument_or_resource_exhausted(speech_text_server):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(speech_text_server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def call(model: str, name: str, datatype: str, shape: list[int], raw: bytes | None = None,
                 strings: list[bytes] | None = None):
            request = service_pb2.ModelInferRequest(model_name=model)
            given = request.inputs.add(name=name, datatype=datatype, shape=shape)
            if raw is not None:
                request.raw_input_contents.append(raw)
            else:
                given.contents.bytes_contents.extend(strings)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)
            return caught.value.code(), caught.value.details()

        code, details = call("sentiment", "text", "BYTES", [1], strings=[b"\xff"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "row 0: not valid UTF-8" in details
        code, details = call("sentiment", "text", "BYTES", [2], strings=[b"ok", b""])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "row 1: empty" in details
        code, details = call("sentiment", "text", "BYTES", [1], raw=_bytes_tensor(b"a" * 65537))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 65536 bytes" in details
        code, details = call("sentiment", "text", "BYTES", [1], strings=[b"a", b"b"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "contents.bytes_contents has 2" in details
        code, details = call("speech", "samples", "FP32", [1, 240001], raw=bytes(4 * 240001))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 240000 samples" in details
