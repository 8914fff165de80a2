"""Speech and text models served: V2 metadata per modality, inference over REST and gRPC with the stock tritonclient
(http and grpc), /classify with a WAV of another rate and channel count and with text, and `tuneline predict`.

The models are built by the real pipeline functions on synthetic data (tests/serving/speech_text_models.py); every
answer is compared with ONNX Runtime run directly on the same file, on the input fitted (core.audio.fit_length) or
tokenized (the file's own tokenizer) as training did it.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.serving.conftest import SENTIMENT, SPEECH
from tests.serving.speech_text_models import (
    SPEECH_RATE,
    offline_logits,
    offline_tokens,
    spec_of,
    tone,
    wav_bytes,
)
from tuneline.core.audio import decode_audio, fit_length, resample, to_mono

SAMPLES = 2000  # the speech model's clip: 0.25 s at 8 kHz
TEXTS = ["great lovely film", "the plot was dull and boring", "a superb, witty story", "weak poor movie",
         "unknownword only", "Great!  LOVELY…   film"]


def _clips(length: int) -> np.ndarray:
    """Two high tones and two low ones, `length` samples each: float32 [4, length]."""
    seconds = length / SPEECH_RATE
    clips = [tone(1200, seconds, SPEECH_RATE, 0.5), tone(1100, seconds, SPEECH_RATE, 0.3, 1.0),
             tone(300, seconds, SPEECH_RATE, 0.5), tone(320, seconds, SPEECH_RATE, 0.7, 2.0)]
    return np.stack(clips).astype(np.float32)


def _expected_audio(speech_model, clips: np.ndarray) -> np.ndarray:
    return offline_logits(speech_model, fit_length(clips, SAMPLES))


@pytest.fixture(scope="module")
def http_client(speech_text_server):
    with httpclient.InferenceServerClient(speech_text_server.url.removeprefix("http://")) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(speech_text_server):
    with grpcclient.InferenceServerClient(speech_text_server.grpc_url) as client:
        yield client


def test_v2_metadata_declares_each_modality_input_over_rest_and_grpc(speech_text_server, http_client, grpc_client,
                                                                     speech_model, text_model):
    speech = http_client.get_model_metadata(SPEECH)
    assert speech["inputs"] == [{"name": "samples", "datatype": "FP32", "shape": [-1, SAMPLES]}]
    text = http_client.get_model_metadata(SENTIMENT)
    assert text["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    for meta, n in ((speech, 2), (text, 2)):
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"logits": [-1, n], "probabilities": [-1, n],
                                                                   "class": [-1]}
    rest = httpx.get(f"{speech_text_server.url}/v2/models/{SPEECH}").json()
    assert rest["parameters"]["modality"] == "audio" and rest["parameters"]["input_sample_rate"] == "8000"
    assert rest["parameters"]["input_max_samples"] == str(30 * SPEECH_RATE)  # serve.max_audio_s, 30 s by default
    assert rest["labels"] == ["high", "low"] and rest["input_spec"]["audio"]["samples"] == SAMPLES
    rest = httpx.get(f"{speech_text_server.url}/v2/models/{SENTIMENT}").json()
    assert rest["labels"] == ["negative", "positive"]
    assert rest["parameters"]["tokenizer_sha256"] == spec_of(text_model).text.sha256
    for name, expected in ((SPEECH, ("samples", "FP32", [-1, SAMPLES])), (SENTIMENT, ("text", "BYTES", [-1]))):
        meta = grpc_client.get_model_metadata(name, as_json=True)
        (given,) = meta["inputs"]
        assert (given["name"], given["datatype"], [int(d) for d in given["shape"]]) == expected


@pytest.mark.parametrize("length", [SAMPLES, 1200, 5000], ids=["the model's length", "shorter", "longer"])
def test_audio_rows_over_rest_and_grpc_equal_onnx_runtime_on_the_fitted_rows(http_client, grpc_client, speech_model,
                                                                               length):
    clips = _clips(length)
    expected = _expected_audio(speech_model, clips)
    assert set(expected.argmax(1)) == {0, 1}, "the tones must be told apart, or classes prove nothing"
    answers = []
    for binary in (True, False):
        tensor = httpclient.InferInput("samples", list(clips.shape), "FP32")
        tensor.set_data_from_numpy(clips, binary_data=binary)
        answers.append(http_client.infer(SPEECH, [tensor]))
    tensor = grpcclient.InferInput("samples", list(clips.shape), "FP32")
    tensor.set_data_from_numpy(clips)
    answers.append(grpc_client.infer(SPEECH, [tensor]))
    for answer in answers:
        np.testing.assert_array_equal(answer.as_numpy("class"), expected.argmax(1))
        np.testing.assert_allclose(answer.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)


def _text_input(module, texts: list[str], binary: bool | None = None):
    tensor = module.InferInput("text", [len(texts)], "BYTES")
    array = np.array(texts, dtype=object)
    tensor.set_data_from_numpy(array) if binary is None else tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_text_strings_over_rest_and_grpc_equal_onnx_runtime_on_the_models_own_tokens(speech_text_server, http_client,
                                                                                      grpc_client, text_model):
    expected = offline_logits(text_model, offline_tokens(text_model, TEXTS))
    assert set(expected.argmax(1)) == {0, 1}
    answers = [http_client.infer(SENTIMENT, [_text_input(httpclient, TEXTS, binary)]) for binary in (True, False)]
    answers.append(grpc_client.infer(SENTIMENT, [_text_input(grpcclient, TEXTS)]))  # raw_input_contents
    for answer in answers:
        np.testing.assert_array_equal(answer.as_numpy("class"), expected.argmax(1))
        np.testing.assert_allclose(answer.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    # Typed contents: bytes_contents, one element per string.
    import grpc

    with grpc.insecure_channel(speech_text_server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=SENTIMENT)
        given = request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)])
        given.contents.bytes_contents.extend(t.encode() for t in TEXTS)
        response = stub.ModelInfer(request)
    classes = np.frombuffer(response.raw_output_contents[2], dtype="<i8")
    np.testing.assert_array_equal(classes, expected.argmax(1))


def test_classify_a_44k_stereo_wav_is_resampled_and_mixed_down(speech_text_server, speech_model):
    """A 300 Hz tone at 44.1 kHz in stereo: read at the model's 8 kHz without resampling it would sound like
    1.65 kHz (a high tone). The answer equals ONNX Runtime on the clip decoded, mixed down, resampled (soxr) and
    fitted as fetch and prepare did."""
    rate = 44100
    left, right = tone(300, 0.4, rate, 0.6), tone(300, 0.4, rate, 0.2, 1.0)
    data = wav_bytes(np.stack([left, right], 1), rate)
    decoded, got_rate = decode_audio(data)
    assert decoded.shape[1] == 2 and got_rate == rate
    expected = offline_logits(speech_model, fit_length(resample(to_mono(decoded), rate, SPEECH_RATE), SAMPLES)[None])
    answers = [httpx.post(f"{speech_text_server.url}/classify", params={"model": SPEECH, "top_k": 2},
                          files={"file": ("clip.wav", data, "audio/wav")}),
               httpx.post(f"{speech_text_server.url}/classify", params={"model": SPEECH}, content=data,
                          headers={"content-type": "audio/wav"})]
    for response in answers:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["label"] == "low" and answer["class"] == int(expected.argmax(1)[0])
        probabilities = np.exp(expected[0] - expected[0].max())
        probabilities /= probabilities.sum()
        assert answer["probabilities"]["low"] == pytest.approx(float(probabilities[1]), abs=1e-5)


def test_classify_text_as_a_body_and_as_a_txt_file(speech_text_server, text_model):
    expected = offline_logits(text_model, offline_tokens(text_model, TEXTS)).argmax(1)
    labels = ["negative", "positive"]
    for text, want in zip(TEXTS, expected, strict=True):
        body = httpx.post(f"{speech_text_server.url}/classify", params={"model": SENTIMENT}, content=text.encode(),
                          headers={"content-type": "text/plain; charset=utf-8"})
        assert body.status_code == 200 and body.json()["label"] == labels[want], body.text
    bom_file = "\ufeff".encode() + TEXTS[0].encode() + b"\n"  # a byte-order mark, as some editors write files
    upload = httpx.post(f"{speech_text_server.url}/classify", params={"model": SENTIMENT, "top_k": 2},
                        files={"file": ("review.txt", bom_file, "text/plain")})
    assert upload.status_code == 200 and upload.json()["label"] == labels[expected[0]], upload.text
    assert [c["label"] for c in upload.json()["top_k"]] == [labels[expected[0]], labels[1 - expected[0]]]


def test_predict_answers_text_and_wav_files_from_the_command_line(speech_text_server, text_model, tmp_path):
    expected = offline_logits(text_model, offline_tokens(text_model, TEXTS[:2])).argmax(1)
    labels = ["negative", "positive"]
    review = tmp_path / "review.txt"
    review.write_text(TEXTS[0])
    clip = tmp_path / "low.wav"
    clip.write_bytes(wav_bytes(tone(300, 0.3, 16000, 0.5), 16000))
    cli = [sys.executable, "-m", "tuneline.flows.cli", "predict", "--url", speech_text_server.url]
    text = subprocess.run([*cli, "--model", SENTIMENT, "--text", TEXTS[0], "--text", TEXTS[1], str(review)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    # Files first, then each --text, one line each.
    assert [line.split(": ", 1)[1].split(" (p=")[0] for line in lines] == [labels[e] for e in (expected[0], *expected)]
    assert lines[0].startswith(f"{review}: ") and lines[1].startswith(f'"{TEXTS[0]}": ')
    assert lines[2].endswith(f"; {SENTIMENT} v0001)")
    speech = subprocess.run([*cli, "--model", SPEECH, str(clip)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False)
    assert speech.returncode == 0 and speech.stdout.startswith(f"{clip}: low (p="), speech.stderr
    refused = subprocess.run([*cli, "--model", SPEECH, "--text", "hello"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "HTTP 415" in refused.stderr and "WAV, FLAC or OGG" in refused.stderr


def test_concurrent_text_and_audio_requests_share_batches_and_keep_their_answers(tmp_path, speech_model, text_model):
    """Requests fired together within a 300 ms window are run as batches of int64 token rows (text) and of fitted
    float32 clips (audio); each caller gets exactly ONNX Runtime's answer for its own rows."""
    import threading

    from tests.serving.conftest import register_models, run_server

    registry = register_models(tmp_path / "registry", {SPEECH: speech_model, SENTIMENT: text_model})
    texts = [[TEXTS[i % len(TEXTS)], TEXTS[(i + 2) % len(TEXTS)]][: 1 + i % 2] for i in range(8)]
    clips = [_clips(length)[i % 4: i % 4 + 1 + i % 2] for i, length in enumerate([SAMPLES, 900, 3000, 2500] * 2)]
    answers: dict[tuple[str, int], np.ndarray] = {}
    with run_server(registry, max_queue_delay_us=300_000, max_batch_size=64) as running:
        batches_before = running.metric("tuneline_batch_size_rows_count")
        barrier = threading.Barrier(len(texts) + len(clips))

        def fire(kind: str, i: int) -> None:
            if kind == "text":
                body = {"inputs": [{"name": "text", "shape": [len(texts[i])], "datatype": "BYTES", "data": texts[i]}]}
            else:
                body = {"inputs": [{"name": "samples", "shape": list(clips[i].shape), "datatype": "FP32",
                                    "data": clips[i].ravel().tolist()}]}
            with httpx.Client(timeout=30) as client:
                barrier.wait()
                response = client.post(f"{running.url}/v2/models/{SENTIMENT if kind == 'text' else SPEECH}/infer",
                                       json=body)
            assert response.status_code == 200, response.text
            logits = next(o for o in response.json()["outputs"] if o["name"] == "logits")
            answers[kind, i] = np.asarray(logits["data"], dtype=np.float32).reshape(logits["shape"])

        threads = [threading.Thread(target=fire, args=(kind, i)) for kind, items in (("text", texts), ("audio", clips))
                   for i in range(len(items))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        batches = running.metric("tuneline_batch_size_rows_count") - batches_before
    assert len(answers) == len(threads)
    for i, rows in enumerate(texts):
        np.testing.assert_allclose(answers["text", i], offline_logits(text_model, offline_tokens(text_model, rows)),
                                   rtol=1e-5, atol=1e-5)
    for i, rows in enumerate(clips):
        np.testing.assert_allclose(answers["audio", i], _expected_audio(speech_model, rows), rtol=1e-4, atol=1e-4)
    assert batches < len(threads) / 2, f"{batches} batches for {len(threads)} requests: not batched"
