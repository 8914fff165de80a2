"""Pydantic models of the Open Inference Protocol messages, for the OpenAPI schema only.

Requests are parsed by serving/protocol.py (faster, and with messages that name the field); these models
document the same shapes at /openapi.json and /docs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, str | int | float | bool]


class Error(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension (the batch)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="loaded versions (request one at /v2/models/{name}/versions/{version})")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters = Field(description="serving version, provider, lineage of the ONNX file")
    labels: list[str] = Field(description="class names, in the order of the logits")
    input_spec: dict[str, Any] = Field(description="the input spec the model was trained on (core/spec.py): "
                                                   "modality (image, audio, text), shape, class names, value range; "
                                                   "audio: sample rate and samples; text: tokenizer and max_length")
    normalization: Any = None
    metrics: Any = None
    card: dict[str, Any] = Field(description="the registry's model card (metrics, gates, lineage, run id)")


class RequestInput(BaseModel):
    name: str = Field(examples=["pixels", "samples", "text"], description="the model's input name (GET "
                                                                          "/v2/models/{name}): pixels, samples or text")
    shape: list[int] = Field(examples=[[1, 1, 28, 28], [1, 8000], [2]],
                             description="images: [N, C, H, W] as the model's metadata declares it, or flat "
                                         "[N, C*H*W]; audio: [N, L] samples, L up to serve.max_audio_s at the model's "
                                         "rate (fitted to the model's length); text: [N] strings")
    datatype: Literal["FP32", "UINT8", "BYTES"] = Field(examples=["UINT8"], description="images: FP32 or UINT8 raw "
                                                        "pixels 0..255; audio: FP32 samples -1..1; text: BYTES (UTF-8)")
    parameters: Parameters | None = Field(None, description='{"binary_data_size": n} when the tensor follows the '
                                                            "JSON as binary (Inference-Header-Content-Length)")
    data: list[Any] | None = Field(None, description="row-major values, flat or nested (BYTES: strings); absent "
                                                     "for binary (BYTES: each element a 4-byte little-endian length, "
                                                     "then its bytes)")


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the classification extension's parameter is refused
    binary_data: bool = Field(False, description="true: this output as binary")


class RequestOutput(BaseModel):
    name: Literal["logits", "probabilities", "class"] = Field(examples=["probabilities"])
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # other request parameters are ignored
    binary_data_output: bool = Field(False, description="true: every output as binary")


class InferenceRequest(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    parameters: RequestParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1, description="the model's one input")
    outputs: list[RequestOutput] | None = Field(None, min_length=1, description="default: every output, as JSON")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class TopClass(BaseModel):
    class_: int = Field(alias="class")
    label: str
    probability: float


class Classification(BaseModel):
    model_name: str
    model_version: str
    class_: int = Field(alias="class")
    label: str = Field(description="the class name, e.g. 'cat' or '7'")
    probability: float
    top_k: list[TopClass] = Field(description="the k most probable classes (?top_k=k or form field top_k; default 1)")
    probabilities: dict[str, float]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = Field(description="champion, loaded or not loaded")


class LoadResult(BaseModel):
    name: str
    version: str
    provider: str = Field(description="the ONNX Runtime execution provider the version runs on")
    role: Literal["champion", "loaded"]
    previous_champion: str | None


REF = "#/components/schemas/{model}"
DOCUMENTED = (InferenceRequest, InferenceResponse, Error, RepositoryEntry, LoadResult)


INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


def add_components(openapi: dict) -> dict:
    """Add the inference paths (plain Starlette routes, unseen by FastAPI) and the protocol models."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in DOCUMENTED:
        schema = model.model_json_schema(ref_template=REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    for path in INFER_PATHS:
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in ("name", "version") if "{" + name + "}" in path]
        versioned = "{version}" in path
        openapi["paths"][path] = {"post": {
            "tags": ["inference"], "operationId": "infer_version" if versioned else "infer",
            "summary": "Inference on one loaded version" if versioned else "Inference on the champion "
                       "(JSON, or JSON + binary tensors)",
            "parameters": parameters, "requestBody": infer_request_body(), "responses": infer_responses()}}
    return describe_answers(openapi)


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def infer_request_body() -> dict:
    binary = {"type": "string", "format": "binary",
              "description": "the JSON request, then the binary tensors; header Inference-Header-Content-Length "
                             "gives the JSON's length"}
    return {"required": True, "content": {"application/json": {"schema": _ref(InferenceRequest),
                                                               "examples": INFER_EXAMPLES},
                                          "application/octet-stream": {"schema": binary}}}


# One request per modality: a speech model fits any clip length up to serve.max_audio_s, a text model takes strings.
INFER_EXAMPLES = {
    "image": {"summary": "an MNIST-shaped image model: raw pixels 0..255, flat",
              "value": {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}],
                        "outputs": [{"name": "class"}]}},
    "audio": {"summary": "a speech model: mono samples -1..1 at its rate, any length (fitted to the model's)",
              "value": {"inputs": [{"name": "samples", "shape": [2, 4], "datatype": "FP32",
                                    "data": [0.0, 0.25, -0.25, 0.0, 0.5, -0.5, 0.5, -0.5]}]}},
    "text": {"summary": "a text model: UTF-8 strings, tokenized by the server with the model's own tokenizer",
             "value": {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                   "data": ["a gorgeous, witty, seductive movie", "dull and boring"]}]}},
}


def infer_responses() -> dict:
    error = {"application/json": {"schema": _ref(Error)}}
    return {"200": {"description": "outputs as JSON, or JSON + binary (application/octet-stream with "
                                   "Inference-Header-Content-Length) when an output asked for binary_data",
                    "content": {"application/json": {"schema": _ref(InferenceResponse)},
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "400": {"description": "bad request: shape, datatype, size mismatch, NaN, unknown output, empty or "
                                   "invalid UTF-8 text", "content": error},
            "401": {"description": "missing or wrong bearer token", "content": error},
            "404": {"description": "unknown model or version", "content": error},
            "413": {"description": "body larger than serve.max_body_bytes, an audio clip longer than "
                                   "serve.max_audio_s, a text row over 64 KiB", "content": error},
            "429": {"description": "too many requests in flight (serve.max_concurrency)", "content": error},
            "503": {"description": "model not ready", "content": error}}


UPLOAD_MEDIA = ("image/png", "image/jpeg", "audio/wav", "audio/flac", "audio/ogg", "text/plain")


def feedback_request_body() -> dict:
    """POST /v2/feedback's body: a captured row's id and its true class."""
    schema = {"type": "object", "required": ["id", "label"], "additionalProperties": False,
              "properties": {"id": {"type": "string", "pattern": "^[0-9A-Za-z]{1,64}$",
                                    "description": "a captured row's id (the x-tuneline-request-id header)"},
                             "label": {"type": "integer", "minimum": 0, "description": "its true class index"}}}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def classify_request_body() -> dict:
    # Exactly what the server reads: one 'file' (what the model takes: an image, a clip, a text) and optionally
    # top_k; nothing else. A raw body of one of UPLOAD_MEDIA works too (the model's modality decides which).
    form = {"type": "object", "required": ["file"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "image models: a PNG or JPEG image, colour or gray, any "
                                                   "size; speech models: a WAV, FLAC or OGG clip, any sample rate "
                                                   "and channel count; text models: UTF-8 text (a .txt file)"},
                           "top_k": {"type": "integer", "minimum": 1, "description": "how many classes to rank"}}}
    encoding = {"file": {"contentType": ", ".join(UPLOAD_MEDIA)}}
    raw = {media: {"schema": {"type": "string", **({} if media == "text/plain" else {"format": "binary"})}}
           for media in UPLOAD_MEDIA}
    raw["text/plain"]["example"] = "a gorgeous, witty, seductive movie"
    return {"required": True, "content": {"multipart/form-data": {"schema": form, "encoding": encoding}, **raw}}


# What each route really answers, beyond what FastAPI infers from the handlers (which answer raw Responses):
# (path, method) -> {status: (description, media type or None for an empty body, schema)}. The fuzz suite
# (tests/serving/test_fuzz.py) checks the server against the result.
EMPTY = None
_ERROR = "application/json"
ANSWERS: dict[tuple[str, str], dict[str, tuple[str, str | None, dict | None]]] = {
    ("/v2/health/live", "get"): {"200": ("live (empty body)", EMPTY, None)},
    ("/v2/health/ready", "get"): {"200": ("ready: a champion is loaded and warm (empty body)", EMPTY, None)},
    ("/v2/models/{name}/ready", "get"): {"200": ("the model's champion is loaded and warm (empty body)", EMPTY, None)},
    ("/v2/models/{name}/versions/{version}/ready", "get"): {"200": ("the version is loaded (empty body)", EMPTY, None)},
    ("/metrics", "get"): {"200": ("Prometheus text exposition format", "text/plain", {"type": "string"})},
    ("/v2/repository/index", "post"): {"200": ("every registry version of every served model", "application/json",
                                              {"type": "array", "items": {"$ref": REF.format(model="RepositoryEntry")}})},
    ("/v2/repository/models/{name}/load", "post"): {
        "200": ("the version now loaded", "application/json", {"$ref": REF.format(model="LoadResult")}),
        "403": ("from a non-loopback client while the server has no admin token", _ERROR, None),
        "404": ("unknown model name or version", _ERROR, None),
        "500": ("serve.workers > 1: loaded here but not by every worker (the message names each; retry)", _ERROR,
                None),
        "503": ("the model has no champion alias yet", _ERROR, None)},
    ("/v2/repository/models/{name}/unload", "post"): {
        "200": ("unloaded (empty body)", EMPTY, None),
        "403": ("from a non-loopback client while the server has no admin token", _ERROR, None),
        "404": ("unknown model name, or the version is not loaded", _ERROR, None),
        "409": ("the version is the champion (promote another version instead)", _ERROR, None),
        "500": ("serve.workers > 1: applied here but not by every worker (the message names each; retry)", _ERROR,
                None)},
    ("/classify", "post"): {"413": ("body larger than serve.max_body_bytes, a clip longer than serve.max_audio_s, a "
                                    "text over 64 KiB", _ERROR, None),
                            "415": ("a raw body of a type the model does not take (an image to a speech model, …)",
                                    _ERROR, None),
                            "429": ("too many requests in flight (serve.max_concurrency)", _ERROR, None)},
}
OPEN = {"/v2/health/live", "/v2/health/ready"}  # no token needed (serving/middleware.py OPEN_PATHS)
ADMIN = {"/v2/repository/models/{name}/load", "/v2/repository/models/{name}/unload"}  # serving/admin.py


def describe_answers(openapi: dict) -> dict:
    """Make every operation's responses what the server answers: empty bodies declared without content, /metrics as
    text, 400 (not FastAPI's 422) for a bad parameter or body, 401 wherever the bearer token applies, and the
    repository routes' own statuses."""
    error = {"application/json": {"schema": _ref(Error)}}
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            validated = responses.pop("422", None) is not None or "requestBody" in operation
            if validated and "400" not in responses:
                responses["400"] = {"description": "bad request: a parameter or the body is malformed", "content": error}
            if path not in OPEN:
                responses.setdefault("401", {"description": "missing or wrong bearer token (the admin token on "
                                                            "admin routes)" if path in ADMIN else
                                                            "missing or wrong bearer token", "content": error})
            for status, (description, media, schema) in ANSWERS.get((path, method), {}).items():
                answer: dict = {"description": description}
                if media is not None:
                    answer["content"] = {media: {"schema": schema or _ref(Error)}}
                responses[status] = answer
    for path, body in repository_request_bodies().items():
        if path in openapi["paths"]:
            openapi["paths"][path]["post"]["requestBody"] = body
    classify = openapi["paths"].get("/classify", {}).get("post")
    if classify is not None:
        classify["requestBody"] = classify_request_body()
        for parameter in classify.get("parameters", []):
            if parameter["name"] == "top_k":  # the handler checks it (protocol.parse_top_k): say so here
                parameter["schema"]["minimum"] = 1
    return openapi


def repository_request_bodies() -> dict[str, dict]:
    """load: an optional {"parameters": {"version": …}} (empty body: reload the champion alias); unload: required."""
    def body(required: bool) -> dict:
        version = {"type": "string", "description": "a registry version id", "examples": ["v0002"]}
        parameters = {"type": "object", "properties": {"version": version}, **({"required": ["version"]} if required else {})}
        schema = {"type": "object", "properties": {"parameters": parameters}, **({"required": ["parameters"]} if required else {})}
        example = {"parameters": {"version": "v0002"}}
        return {"required": required, "content": {"application/json": {"schema": schema, "example": example}}}

    return {"/v2/repository/models/{name}/load": body(False), "/v2/repository/models/{name}/unload": body(True)}
