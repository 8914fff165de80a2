"""Pydantic models of the Open Inference Protocol messages, for the OpenAPI schema only.

Requests are parsed by serving/protocol.py (faster, and with messages that name the field); these models
document the same shapes at /openapi.json and /docs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

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
    input_spec: dict[str, Any] = Field(description="the input spec the model was trained on (tasks/data/spec.py): "
                                                   "channels, height, width, class names, mean/std, value range")
    normalization: Any = None
    metrics: Any = None
    card: dict[str, Any] = Field(description="the registry's model card (metrics, gates, lineage, run id)")


class RequestInput(BaseModel):
    name: str = Field(examples=["pixels"])
    shape: list[int] = Field(examples=[[1, 1, 28, 28]], description="[N, C, H, W] as the model's metadata declares "
                                                                    "it, or flat [N, C*H*W]")
    datatype: str = Field(examples=["UINT8"], description="FP32 or UINT8; raw pixels 0..255")
    parameters: Parameters | None = Field(None, description='{"binary_data_size": n} when the tensor follows the '
                                                            "JSON as binary (Inference-Header-Content-Length)")
    data: list[Any] | None = Field(None, description="row-major values, flat or nested; absent for binary")


class RequestOutput(BaseModel):
    name: str = Field(examples=["probabilities"], description="logits, probabilities or class")
    parameters: Parameters | None = Field(None, description='{"binary_data": true} to get it as binary')


class InferenceRequest(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    parameters: Parameters | None = Field(None, description='{"binary_data_output": true}: every output as binary')
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="default: every output, as JSON")


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


REF = "#/components/schemas/{model}"
DOCUMENTED = (InferenceRequest, InferenceResponse, Error)


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
    return openapi


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def infer_request_body() -> dict:
    binary = {"type": "string", "format": "binary",
              "description": "the JSON request, then the binary tensors; header Inference-Header-Content-Length "
                             "gives the JSON's length"}
    return {"required": True, "content": {"application/json": {"schema": _ref(InferenceRequest)},
                                          "application/octet-stream": {"schema": binary}}}


def infer_responses() -> dict:
    error = {"application/json": {"schema": _ref(Error)}}
    return {"200": {"description": "outputs as JSON, or JSON + binary (application/octet-stream with "
                                   "Inference-Header-Content-Length) when an output asked for binary_data",
                    "content": {"application/json": {"schema": _ref(InferenceResponse)}}},
            "400": {"description": "bad request: shape, datatype, size mismatch, NaN, unknown output",
                    "content": error},
            "401": {"description": "missing or wrong bearer token", "content": error},
            "404": {"description": "unknown model or version", "content": error},
            "413": {"description": "body larger than serve.max_body_bytes", "content": error},
            "429": {"description": "too many requests in flight (serve.max_concurrency)", "content": error},
            "503": {"description": "model not ready", "content": error}}


def classify_request_body() -> dict:
    form = {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary", "description": "a PNG or JPEG image, colour or gray, any size"},
                           "top_k": {"type": "integer", "minimum": 1, "description": "how many classes to rank"}}}
    return {"required": True, "content": {"multipart/form-data": {"schema": form},
                                          "image/png": {"schema": {"type": "string", "format": "binary"}},
                                          "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}
