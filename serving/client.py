"""A small Python client for the server (and any Open Inference Protocol server): JSON or binary tensors.

    with InferenceClient("http://127.0.0.1:8000", model="cifar10") as client:
        result = client.infer(images)       # uint8 or float32 [N, C, H, W] / [N, H, W, C] / [N, C*H*W] (/ [N, H, W] gray)
        result.outputs["class"], result.model_version
        client.classify("cat.jpg", top_k=3)  # {"class": 3, "label": "cat", "probability": 0.91, "top_k": [...], ...}
    with InferenceClient(url, model="speech") as client:
        client.infer(samples)                # float32 [N, L] (or [L]) mono samples -1..1 at the model's rate
        client.classify("7_jackson_0.wav")   # a WAV/FLAC/OGG clip, any rate and channel count
    with InferenceClient(url, model="sst2") as client:
        client.infer(["a gorgeous movie", "dull"])  # strings: a BYTES tensor
        client.classify_text("a gorgeous, witty, seductive movie")  # or client.classify("review.txt")

The input's name, datatype and shape come from the model's V2 metadata, so the client follows whatever the model
takes.
`model` may be left out when the server serves one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import numpy as np
import orjson

from tuneline.serving.binary import (
    DTYPES,
    HEADER_LENGTH,
    OCTET_STREAM,
    datatype_of,
    encode_body,
    split_body,
    tensor_bytes,
    tensor_from_bytes,
)
from tuneline.serving.inputs import encode_bytes_elements

UPLOAD_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".wav": "audio/wav",
                ".flac": "audio/flac", ".ogg": "audio/ogg", ".txt": "text/plain"}


class ServerError(RuntimeError):
    """The server answered with an error status; `status` and the server's message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    id: str | None
    outputs: dict[str, np.ndarray]


class InferenceClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", model: str | None = None, token: str | None = None,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None):
        """`model` defaults to the one model the server serves (asked once; an error when it serves several);
        `token` is the bearer token, if any."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self._model, self._metadata = model, None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # --- health and metadata -------------------------------------------------------------------------------
    def live(self) -> bool:
        return self.http.get("/v2/health/live").status_code == 200

    def ready(self) -> bool:
        return self.http.get("/v2/health/ready").status_code == 200

    def server_metadata(self) -> dict:
        return self._checked(self.http.get("/v2")).json()

    def model_metadata(self, version: str | None = None) -> dict:
        return self._checked(self.http.get(self._model_path(version))).json()

    @property
    def model(self) -> str:
        if self._model is None:
            # The index names the served model without needing to know it first.
            entries = self._checked(self.http.post("/v2/repository/index")).json()
            names = sorted({e["name"] for e in entries if e.get("state") == "READY"})
            if len(names) != 1:
                which = f"it serves {', '.join(names)}: pass model=" if names else f"none is ready (index: {entries})"
                raise ServerError(503, f"cannot tell which model to use: {which}"[:300])
            self._model = names[0]
        return self._model

    # --- inference -----------------------------------------------------------------------------------------
    def infer(self, pixels, version: str | None = None,
              outputs: tuple[str, ...] = ("class", "probabilities"), binary: bool = True,
              request_id: str | None = None) -> InferResult:
        """One input per leading row, as the model's metadata says: images as raw pixels 0..255 (uint8 sent as UINT8,
        anything else as FP32); audio as float32 samples [N, L] (or one clip [L]); text as strings (BYTES)."""
        if self._datatype() == "BYTES":
            values = [pixels] if isinstance(pixels, (str, bytes)) else list(pixels)
            tensor = {"name": self._input_name(), "shape": [len(values)], "datatype": "BYTES"}
            data = encode_bytes_elements(values)
            json_data = [v if isinstance(v, str) else bytes(v).decode("utf-8") for v in values] if not binary else None
        else:
            array = self._prepare(np.asarray(pixels))
            if array.dtype != np.uint8:
                array = array.astype(np.float32)
            tensor = {"name": self._input_name(), "shape": self._input_shape(array), "datatype": datatype_of(array)}
            data = tensor_bytes(array) if binary else None
            json_data = array.ravel() if not binary else None
        buffers = []
        if binary:
            tensor["parameters"] = {"binary_data_size": len(data)}
            buffers.append(data)
        else:
            tensor["data"] = json_data
        request = {"inputs": [tensor], "outputs": [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]}
        if request_id is not None:
            request["id"] = request_id
        body, json_length = encode_body(request, buffers)
        headers = {"content-type": OCTET_STREAM if json_length is not None else "application/json"}
        if json_length is not None:
            headers[HEADER_LENGTH] = str(json_length)
        response = self._checked(self.http.post(self._model_path(version) + "/infer", content=body, headers=headers))
        return parse_infer_response(response.content, response.headers.get(HEADER_LENGTH))

    def classify(self, upload: Path | str | bytes, version: str | None = None, top_k: int = 1) -> dict:
        """Upload one file as the model takes it: a PNG/JPEG image (colour or gray, any size), a WAV/FLAC/OGG clip
        (any rate and channel count) or a UTF-8 .txt file; the server's class, label, top k, probabilities."""
        data = upload if isinstance(upload, bytes) else Path(upload).read_bytes()
        name = "upload" if isinstance(upload, bytes) else Path(upload).name
        media = UPLOAD_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
        return self._classify(version, top_k, files={"file": (name, data, media)})

    def classify_text(self, text: str, version: str | None = None, top_k: int = 1) -> dict:
        """Send one text (a text/plain body, UTF-8) to a text model; the server's class, label, top k, probabilities."""
        return self._classify(version, top_k, content=text.encode("utf-8"),
                              headers={"content-type": "text/plain; charset=utf-8"})

    def _classify(self, version: str | None, top_k: int, **body) -> dict:
        params: dict = {"top_k": top_k}
        if version:
            params["version"] = version
        if self._model is not None:  # else the server's only model (it says so when there are several)
            params["model"] = self._model
        return self._checked(self.http.post("/classify", params=params, **body)).json()

    # --- repository ----------------------------------------------------------------------------------------
    def load(self, version: str | None = None) -> dict:
        """Reload the champion alias, or load one version by id."""
        body = {"parameters": {"version": version}} if version else {}
        return self._checked(self.http.post(f"/v2/repository/models/{self.model}/load", json=body)).json()

    # --- helpers -------------------------------------------------------------------------------------------
    def _model_path(self, version: str | None) -> str:
        return f"/v2/models/{self.model}" + (f"/versions/{version}" if version else "")

    def _metadata_once(self) -> dict:
        if self._metadata is None:
            self._metadata = self.model_metadata()
        return self._metadata

    def _input_name(self) -> str:
        return self._metadata_once()["inputs"][0]["name"]

    def _datatype(self) -> str:
        return self._metadata_once()["inputs"][0]["datatype"]

    def _prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Images given channels-last ([N, H, W, C] or [H, W, C], as PIL and OpenCV give them) made [N, C, H, W]."""
        row = self._metadata_once()["inputs"][0]["shape"][1:]
        if len(row) != 3:  # audio: [N, L] samples
            return pixels
        channels, height, width = row
        if channels > 1 and pixels.shape[-3:] == (height, width, channels) and pixels.shape[-3:] != (channels, height, width):
            pixels = np.moveaxis(pixels, -1, -3)
        return pixels

    def _input_shape(self, pixels: np.ndarray) -> list[int]:
        """[N, *row] or [N, flat] as given; anything else holding whole images (e.g. [N, 28, 28]) as [N, *row]. Audio:
        [N, L] as given, one clip [L] as [1, L] (the server fits any length up to serve.max_audio_s)."""
        row = self._metadata_once()["inputs"][0]["shape"][1:]
        if len(row) == 1:
            if pixels.ndim not in (1, 2) or pixels.size == 0:
                raise ValueError(f"samples of shape {pixels.shape}: send one clip [L] or clips [N, L]")
            return list(pixels.shape) if pixels.ndim == 2 else [1, pixels.shape[0]]
        count = int(np.prod(row))
        if pixels.ndim >= 2 and list(pixels.shape[1:]) in (row, [count]):
            return list(pixels.shape)
        if pixels.size == 0 or pixels.size % count:
            raise ValueError(f"pixels of shape {pixels.shape} do not split into images of shape {row}")
        return [pixels.size // count, *row]

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise ServerError(response.status_code, message)
        return response


def parse_infer_response(body: bytes, header_length: str | None) -> InferResult:
    """A V2 inference response (JSON, or JSON + binary outputs) as numpy arrays."""
    head, binary = split_body(body, header_length)
    doc = orjson.loads(head)
    outputs, offset = {}, 0
    for out in doc["outputs"]:
        shape, datatype = out["shape"], out["datatype"]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            outputs[out["name"]] = tensor_from_bytes(binary[offset:offset + size], datatype, shape)
            offset += size
        else:
            outputs[out["name"]] = np.asarray(out["data"], dtype=DTYPES[datatype]).reshape(shape)
    return InferResult(doc["model_name"], doc.get("model_version", ""), doc.get("id"), outputs)
