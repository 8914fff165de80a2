"""Open Inference Protocol (KServe V2) over REST: health, server and model metadata, model ready, infer.

Handlers read the raw body and answer with raw bytes (orjson), so an inference request costs no pydantic
validation of 784 numbers; the pydantic models in `schemas` only document the API in /openapi.json.
"""

from __future__ import annotations

from dataclasses import replace

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.routing import Match, Route

from tuneline.serving import protocol, schemas
from tuneline.serving.binary import HEADER_LENGTH, OCTET_STREAM
from tuneline.serving.challenger import CLIENT_KEY, REQUEST_ID_HEADER, VERSION_HEADER
from tuneline.serving.dataplane import DataPlane, Served
from tuneline.serving.errors import BadRequest

JSON = "application/json"


def json_response(content, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=JSON)


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def answer_headers(served: Served) -> dict[str, str]:
    """Which version answered, and the captured rows' ids (serve.capture) when this request was captured."""
    headers = {VERSION_HEADER: served.version}
    if served.ids:
        headers[REQUEST_ID_HEADER] = ",".join(served.ids)
    return headers


def register(app: FastAPI, dataplane: DataPlane) -> None:
    _inference_routes(app, dataplane)
    _health_routes(app, dataplane)
    _model_routes(app, dataplane)


def _inference_routes(app: FastAPI, dataplane: DataPlane) -> None:
    """The hot path as plain Starlette routes, first in the router.

    A FastAPI route would solve dependencies for every request and sit behind the other routes in the
    match order. Measured on 2 cores, this took the event loop's CPU per binary request from 0.87 to
    0.56 ms. Their OpenAPI entries come from schemas.add_components.
    """
    async def infer(request: Request) -> Response:
        # The version that answers: the one named, else the champion or (canary) the challenger, by the client key.
        route = dataplane.route(request.path_params["name"], request.path_params.get("version"),
                                request.headers.get(CLIENT_KEY))
        model = route.model
        if request.headers.get("content-encoding", "identity") != "identity":
            raise BadRequest(f"Content-Encoding {request.headers['content-encoding']!r} is not supported: send the "
                             "body uncompressed (binary tensors are already compact)")
        body = await request.body()
        parsed = protocol.parse_infer_request(body, request.headers.get(HEADER_LENGTH), model)
        served = await dataplane.serve(route, parsed.rows, parsed.texts)
        if served.ids and parsed.id is None:  # the captured rows' ids, for POST /v2/feedback
            parsed = replace(parsed, id=",".join(served.ids))
        content, json_length = protocol.encode_infer_response(parsed, model, served.outputs)
        headers = answer_headers(served)
        if json_length is None:
            return Response(content, media_type=JSON, headers=headers)
        headers[HEADER_LENGTH] = str(json_length)
        return Response(content, media_type=OCTET_STREAM, headers=headers)

    app.router.routes[0:0] = [_LabelledRoute(path, infer, methods=["POST"]) for path in schemas.INFER_PATHS]


class _LabelledRoute(Route):
    """A Starlette route that, like FastAPI's, records itself in the scope (the metrics label it by path)."""

    def matches(self, scope):
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def _health_routes(app: FastAPI, dataplane: DataPlane) -> None:
    @app.get("/v2/health/live", tags=["health"], summary="Server live (200, empty body)")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["health"], summary="Server ready: a champion is loaded and warm (200), "
             "else 503", responses={503: {"model": schemas.Error}})
    async def ready():
        if not dataplane.ready():  # also from SIGTERM on, while it still serves (serving/drain.py)
            return error_response(503, f"not ready: {dataplane.not_ready_reason()}")
        return Response(status_code=200)

    @app.get("/v2", tags=["metadata"], response_model=schemas.ServerMetadata)
    async def server_metadata():
        return json_response(dataplane.server_metadata())


def _model_routes(app: FastAPI, dataplane: DataPlane) -> None:
    errors = {400: {"model": schemas.Error}, 404: {"model": schemas.Error}, 503: {"model": schemas.Error}}

    @app.get("/v2/models/{name}", tags=["metadata"], response_model=schemas.ModelMetadata, responses=errors)
    async def model_metadata(name: str):
        return json_response(dataplane.model_metadata(name, None))

    @app.get("/v2/models/{name}/versions/{version}", tags=["metadata"], response_model=schemas.ModelMetadata,
             responses=errors)
    async def model_version_metadata(name: str, version: str):
        return json_response(dataplane.model_metadata(name, version))

    # REST answers why a model is not ready (404 unknown, 503 not loaded or shutting down); probe_model raises which.
    @app.get("/v2/models/{name}/ready", tags=["health"], responses=errors)
    async def ready(name: str):
        dataplane.probe_model(name, None)
        return Response(status_code=200)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["health"], responses=errors)
    async def version_ready(name: str, version: str):
        dataplane.probe_model(name, version)
        return Response(status_code=200)
