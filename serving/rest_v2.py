"""Open Inference Protocol (KServe V2) over REST: health, server and model metadata, model ready, infer.

Handlers read the raw body and answer with raw bytes (orjson), so an inference request costs no pydantic
validation of 784 numbers; the pydantic models in `schemas` only document the API in /openapi.json.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

import orjson
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match, Route

from tuneline.serving import protocol, schemas
from tuneline.serving.binary import HEADER_LENGTH, OCTET_STREAM
from tuneline.serving.challenger import CLIENT_KEY, REQUEST_ID_HEADER, VERSION_HEADER
from tuneline.serving.dataplane import DataPlane, Served
from tuneline.serving.errors import BadRequest, ServingError
from tuneline.serving.middleware import error_headers

log = logging.getLogger("tuneline.serving.app")

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


class InferenceEndpoint:
    """POST /v2/models/{name}[/versions/{version}]/infer: the hot path.

    It is answered twice over: as plain Starlette routes, first in the router (what OpenAPI documents and what a
    request reaches through FastAPI's middleware stack), and as a bare ASGI app that app.InferenceServer calls ahead
    of that stack, behind a Gatekeeper of its own (the same auth, limits, metrics and access log). FastAPI's and
    Starlette's layers (error middlewares, exit stacks, the router, Request and Response objects) were a fifth of
    the event loop's CPU per request at 64 connections (docs/benchmarks.md, inference server); the answer, the
    checks and the error bodies are the same either way, since both call `answer`.
    """

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane
        self.routes = [_LabelledRoute(path, self._starlette_endpoint, methods=["POST"]) for path in schemas.INFER_PATHS]

    async def answer(self, path_params: dict, header: Callable[[str], str | None], body: Callable[[], Awaitable[bytes]]
                     ) -> tuple[bytes, str, dict[str, str]]:
        """(content, media type, headers) of a 200 answer; ServingError for a request it refuses. `header(name)`
        reads a request header (lower case name); `body()` reads the whole body."""
        dataplane = self.dataplane
        # The version that answers: the one named, else the champion or (canary) the challenger, by the client key.
        route = dataplane.route(path_params["name"], path_params.get("version"), header(CLIENT_KEY))
        model = route.model
        encoding = header("content-encoding")
        if encoding is not None and encoding != "identity":
            raise BadRequest(f"Content-Encoding {encoding!r} is not supported: send the body uncompressed (binary "
                             "tensors are already compact)")
        parsed = protocol.parse_infer_request(await body(), header(HEADER_LENGTH), model)
        served = await dataplane.serve(route, parsed.rows, parsed.texts)
        if served.ids and parsed.id is None:  # the captured rows' ids, for POST /v2/feedback
            parsed = replace(parsed, id=",".join(served.ids))
        content, json_length = protocol.encode_infer_response(parsed, model, served.outputs)
        headers = answer_headers(served)
        if json_length is None:
            return content, JSON, headers
        headers[HEADER_LENGTH] = str(json_length)
        return content, OCTET_STREAM, headers

    async def _starlette_endpoint(self, request: Request) -> Response:
        content, media_type, headers = await self.answer(request.path_params, request.headers.get, request.body)
        return Response(content, media_type=media_type, headers=headers)

    def match(self, scope) -> bool:
        """Whether `scope` is an inference request; if so, sets its route and path parameters as the router would."""
        if scope["method"] != "POST" or scope.get("root_path"):  # a root path: the router knows how to strip it
            return False
        parts = scope["path"].split("/")
        # ["", "v2", "models", name, "infer"] or ["", "v2", "models", name, "versions", version, "infer"]
        if parts[-1] != "infer" or parts[1:3] != ["v2", "models"] or not parts[3]:
            return False
        if len(parts) == 5:
            scope["route"], scope["path_params"] = self.routes[0], {"name": parts[3]}
            return True
        if len(parts) == 7 and parts[4] == "versions" and parts[5]:
            scope["route"], scope["path_params"] = self.routes[1], {"name": parts[3], "version": parts[5]}
            return True
        return False

    async def __call__(self, scope, receive, send) -> None:
        """The bare ASGI answer to a request `match` accepted."""
        headers = dict(scope["headers"])

        def header(name: str) -> str | None:
            value = headers.get(name.encode("latin-1"))
            return None if value is None else value.decode("latin-1")

        async def body() -> bytes:
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        try:
            content, media_type, extra = await self.answer(scope["path_params"], header, body)
        except ClientDisconnect:
            return  # nobody to answer
        except Exception as exc:  # noqa: BLE001 - answered as the app's error handlers answer it
            await error_answer(exc, scope["path"])(scope, receive, send)
            return
        response_headers = [(b"content-type", media_type.encode()), (b"content-length", str(len(content)).encode())]
        response_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": content})


def error_answer(exc: Exception, path: str) -> Response:
    """What a request that raised `exc` is answered: a ServingError's status and message, or a logged 500."""
    if isinstance(exc, ServingError):
        return error_response(exc.status, str(exc), error_headers(exc))
    log.error("unhandled error", exc_info=exc, extra={"event": "internal_error", "path": path})
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


def _inference_routes(app: FastAPI, dataplane: DataPlane) -> None:
    """The inference routes first in the router (the hot path matches first), and app.state.inference for
    app.InferenceServer's bare path."""
    endpoint = app.state.inference = InferenceEndpoint(dataplane)
    app.router.routes[0:0] = endpoint.routes


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
