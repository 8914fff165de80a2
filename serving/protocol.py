"""Open Inference Protocol (KServe V2) messages: parse an inference request, build responses and metadata.

Everything a client can get wrong is a BadRequest (400) with a message naming the field and what is
expected (an audio clip past serve.max_audio_s or an oversized text: 413); nothing here lets bad input reach
ONNX Runtime. What each modality's input is, and how it becomes the graph's rows, is serving/inputs.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import metadata as package_metadata

import numpy as np
import orjson

from tuneline.serving import inputs
from tuneline.serving.binary import encode_body, split_body, tensor_bytes, tensor_from_bytes
from tuneline.serving.errors import BadRequest
from tuneline.serving.model_holder import LoadedModel

SERVER_NAME = "tuneline"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
OUTPUT_DATATYPES = {"logits": "FP32", "probabilities": "FP32", "class": "INT64"}  # what LoadedModel.run returns
# Elements one request may declare. Counted in Python integers, before any array exists: numpy's int64 product
# wraps ([2**62, 784] is "0 elements"). serve.max_body_bytes (gRPC: its message limit) bounds real requests far
# lower; this bound only keeps absurd shapes away from numpy.
MAX_ELEMENTS = 2**31 - 1


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    rows: np.ndarray  # validated rows the graph takes: float32 pixels or samples, int64 token ids
    outputs: list[tuple[str, bool]]  # (output name, send as binary)
    texts: list[str] | None = None  # a text model's strings, as sent (serve.capture records them)


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false, got {value!r}")
    return value


def _has_bool(data: list) -> bool:
    """Whether a JSON array holds true/false at any depth (numpy would read them as 1 and 0)."""
    types = set(map(type, data))  # C-speed: ~15 µs for one 784-pixel image
    return bool in types or (list in types and any(_has_bool(d) for d in data if type(d) is list))


def _json_tensor(data, datatype: str, shape: list[int], name: str, may_hold_bools: bool = True) -> np.ndarray:
    """`data` as a numeric array of `shape`; `may_hold_bools` False when the request's JSON has no true/false
    anywhere (the scan of every element's type is then skipped: a few µs for the whole body against ~15 µs)."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: data must be a JSON array, got {type(data).__name__}")
    try:
        if data and not isinstance(data[0], list):  # flat: fromiter is twice as fast as asarray on a list
            array = np.fromiter(data, dtype=np.float64, count=len(data))
        else:
            array = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0]
        raise BadRequest(f"input {name!r}: data is not a regular array of numbers ({reason})") from None
    if may_hold_bools and _has_bool(data):
        raise BadRequest(f"input {name!r}: data holds true/false: pixels are numbers")
    count = math.prod(shape)
    if array.size != count:
        raise BadRequest(f"input {name!r}: shape {shape} has {count} elements but data has {array.size}")
    if datatype == "UINT8":
        if array.size and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array))):
            raise BadRequest(f"input {name!r}: UINT8 data must be integers 0..255")
        return array.astype(np.uint8).reshape(shape)
    return array.astype(np.float32).reshape(shape)


def parse_infer_request(body: bytes, header_length: str | None, model: LoadedModel) -> InferRequest:
    """Validate a V2 inference request (JSON, or JSON + binary tensors) against the model."""
    head, binary = split_body(body, header_length)
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadRequest('request body must be a JSON object: {"inputs": [{"name", "shape", "datatype", "data"}]}')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"id must be a string, got {request_id!r}")
    parameters = _object(doc.get("parameters"), "parameters")
    # The message's own fields before the tensor: an error there is the same whichever model is asked.
    outputs = requested_outputs(doc.get("outputs"), parameters)
    given = doc.get("inputs")
    if not isinstance(given, list) or len(given) != 1:
        raise BadRequest(f"inputs must be a list holding the one input {model.input_name!r}; got "
                         f"{len(given) if isinstance(given, list) else type(given).__name__}")
    spec = _object(given[0], "inputs[0]")
    name, datatype = spec.get("name"), spec.get("datatype")
    shape = check_input(name, datatype, spec.get("shape"), model)
    input_parameters = _object(spec.get("parameters"), f"input {name!r} parameters")
    if "binary_data_size" in input_parameters:
        size = input_parameters["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
        if "data" in spec:
            raise BadRequest(f"input {name!r} has both \"data\" and binary_data_size: send one")
        if size != len(binary):  # one input, so it owns every byte after the JSON
            raise BadRequest(f"input {name!r}: binary_data_size {size} but {len(binary)} bytes follow the JSON "
                             "(check Inference-Header-Content-Length)")
        array = tensor_from_wire(binary, datatype, shape, name)
    else:
        if len(binary):
            raise BadRequest(f"{len(binary)} bytes follow the JSON but no input has parameters.binary_data_size")
        if spec.get("data") is None:
            raise BadRequest(f"input {name!r} has neither \"data\" nor parameters.binary_data_size")
        if datatype == "BYTES":
            array = inputs.json_strings(spec["data"], shape, name)
        else:
            array = _json_tensor(spec["data"], datatype, shape, name, b"true" in head or b"false" in head)
    return InferRequest(id=request_id, rows=to_rows(array, datatype, shape, name, model), outputs=outputs,
                        texts=sent_texts(array, model))


def sent_texts(values, model: LoadedModel) -> list[str] | None:
    """A text model's input strings as sent (checked already by to_rows); None for other modalities."""
    if model.modality != "text":
        return None
    return [v if isinstance(v, str) else bytes(v).decode("utf-8", "replace") for v in values]


def check_input(name, datatype, shape, model: LoadedModel) -> list[int]:
    """The one input's name, datatype and shape against the model (REST and gRPC); returns the shape."""
    if name != model.input_name:
        raise BadRequest(f"unknown input {name!r}: model {model.name!r} takes {model.input_name!r}")
    accepted = inputs.v2_datatypes(model)
    if datatype not in accepted:
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not accepted: use {' or '.join(accepted)}")
    return inputs.check_shape(shape, name, model, MAX_ELEMENTS)


def tensor_from_wire(data, datatype: str, shape: list[int], name: str):
    """A checked input's binary form (binary extension, gRPC raw_input_contents): a numeric array, or for BYTES
    the list of its elements' bytes."""
    if datatype == "BYTES":
        return inputs.bytes_elements(data, math.prod(shape), name)
    return tensor_from_bytes(data, datatype, shape)


def to_rows(values, datatype: str, shape: list[int], name: str, model: LoadedModel) -> np.ndarray:
    """A checked input (array, or strings for BYTES) -> the rows the model's graph takes (serving/inputs.py)."""
    if model.modality == "text":
        return inputs.text_rows(values, name, model)
    if model.modality == "audio":
        return inputs.audio_rows(np.asarray(values).reshape(shape), name, model)
    return to_pixels(values, datatype, shape, name, model)


def to_pixels(array: np.ndarray, datatype: str, shape: list[int], name: str, model: LoadedModel) -> np.ndarray:
    """A checked input tensor -> float32 [rows, *image_shape]; FP32 values must be finite and in the model's range."""
    pixels = array.reshape(shape[0], *model.image_shape).astype(np.float32, copy=False)
    if datatype == "FP32":
        low, high = model.value_range
        least, most = pixels.min(), pixels.max()
        if low <= least and most <= high:  # False for a NaN (every comparison with it is): the common case is 2 passes
            return pixels
        if not np.isfinite(pixels).all():
            raise BadRequest(f"input {name!r} contains NaN or infinite values")
        if least < low or most > high:
            raise BadRequest(f"input {name!r}: values span [{least:g}, {most:g}] but the model takes "
                             f"raw pixels in [{low:g}, {high:g}] (normalisation is inside the model: do not normalise)")
    return pixels


def requested_outputs(requested, parameters: dict) -> list[tuple[str, bool]]:
    binary_default = _bool(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    if requested is None:
        return [(name, binary_default) for name in OUTPUT_DATATYPES]
    if not isinstance(requested, list) or not requested:
        raise BadRequest(f"outputs must be a non-empty list of {{\"name\": ...}}; got {requested!r}"[:200])
    chosen: list[tuple[str, bool]] = []
    for entry in requested:
        entry = _object(entry, "each of outputs")
        name = entry.get("name")
        if name not in OUTPUT_DATATYPES:
            raise BadRequest(f"unknown output {name!r}: the model has {', '.join(OUTPUT_DATATYPES)}")
        params = _object(entry.get("parameters"), f"output {name!r} parameters")
        if "classification" in params:
            raise BadRequest("the classification extension is not supported: request 'class' and 'probabilities'")
        chosen.append((name, _bool(params.get("binary_data", binary_default), f"output {name!r} binary_data")))
    return chosen


def encode_infer_response(request: InferRequest, model: LoadedModel,
                          results: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """(body, JSON length or None): JSON tensors inline, binary ones after the JSON in output order."""
    header: dict = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        header["id"] = request.id
    outputs, buffers = [], []
    for name, binary in request.outputs:
        value = results[name]
        entry: dict = {"name": name, "datatype": OUTPUT_DATATYPES[name], "shape": list(value.shape)}
        if binary:
            data = tensor_bytes(value)
            entry["parameters"] = {"binary_data_size": len(data)}
            buffers.append(data)
        else:
            entry["data"] = np.ascontiguousarray(value).ravel()
        outputs.append(entry)
    header["outputs"] = outputs
    return encode_body(header, buffers)


def server_metadata() -> dict:
    try:
        version = package_metadata.version("tuneline")
    except package_metadata.PackageNotFoundError:  # running from a source tree that was not pip-installed
        version = "unknown"
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


def parse_top_k(value, model: LoadedModel) -> int:
    """top_k from the query or a form field: an integer 1..n_classes (larger is capped at n_classes)."""
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"top_k must be an integer ≥ 1, got {value!r}") from None
    if k < 1:
        raise BadRequest(f"top_k must be ≥ 1, got {k}")
    return min(k, len(model.labels))


def classification(model: LoadedModel, probabilities: np.ndarray, top_k: int = 1) -> dict:
    """/classify's answer: the best class, its name and probability, the top k, and every class's probability."""
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    best = int(order[0])
    labels = model.labels
    return {"model_name": model.name, "model_version": model.version, "class": best, "label": labels[best],
            "probability": float(probabilities[best]),
            "top_k": [{"class": int(i), "label": labels[i], "probability": float(probabilities[i])} for i in order],
            "probabilities": {label: float(p) for label, p in zip(labels, probabilities, strict=True)}}


def model_metadata(model: LoadedModel, versions: list[str]) -> dict:
    """V2 model metadata plus what the ONNX file and the model card say about the model."""
    n_classes = len(model.labels)
    meta = model.metadata
    datatypes = inputs.v2_datatypes(model)
    return {
        "name": model.name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.input_name, "datatype": datatypes[0], "shape": inputs.v2_shape(model)}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, n_classes]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_classes]},
                    {"name": "class", "datatype": "INT64", "shape": [-1]}],
        "parameters": {"version": model.version, "provider": model.provider, "modality": model.modality,
                       "input_datatypes": ",".join(datatypes), **_input_parameters(model),
                       **{k: meta[k] for k in ("data_version", "git_commit", "params_hash", "created") if k in meta}},
        "labels": model.labels,
        "input_spec": model.spec.to_dict(),
        "normalization": _loads(meta.get("normalization")),
        "metrics": _loads(meta.get("metrics")),
        "card": {k: v for k, v in model.card.items() if k != "files"},
    }


def _input_parameters(model: LoadedModel) -> dict[str, str]:
    """What a client needs to build the input, beyond name, datatype and shape (strings, as V2 parameters are)."""
    spec = model.spec
    if spec.audio is not None:
        return {"input_range": "{:g}..{:g}".format(*spec.value_range), "input_layout": spec.layout,
                "input_sample_rate": str(spec.audio.sample_rate), "input_samples": str(spec.audio.samples),
                "input_max_samples": str(model.max_samples), "input_fit": spec.audio.fit}
    if spec.text is not None:
        return {"input_encoding": "UTF-8", "input_max_bytes": str(inputs.MAX_TEXT_BYTES),
                "input_max_tokens": str(spec.text.max_length), "tokenizer": spec.text.tokenizer,
                "tokenizer_sha256": spec.text.sha256}
    return {"input_range": "{:g}..{:g}".format(*model.value_range),
            "input_flat_shape": f"-1,{int(np.prod(model.image_shape))}",
            "input_layout": spec.layout, "input_color": spec.color}


def _loads(text: str | None):
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return text
