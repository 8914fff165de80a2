"""The HTTP app: Open Inference Protocol (KServe V2) routes, model repository routes, /classify, /metrics.

Handlers read the raw body and answer with raw bytes (orjson), so an inference request costs no pydantic
validation of 784 numbers; the pydantic models in `schemas` only document the API in /openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match, Route

from tuneline.serving import protocol, schemas
from tuneline.serving.binary import HEADER_LENGTH, OCTET_STREAM
from tuneline.serving.drain import Drain
from tuneline.serving.errors import BadRequest, NotFound, NotReady, ServingError
from tuneline.serving.grpc_server import start_grpc
from tuneline.serving.images import decode_image
from tuneline.serving.metrics import ServingMetrics
from tuneline.serving.middleware import Gatekeeper, InFlight, error_headers
from tuneline.serving.model_holder import ModelHolder
from tuneline.serving.settings import ServeSettings
from tuneline.serving.watcher import watch_champion

log = logging.getLogger("tuneline.serving.app")

JSON = "application/json"


def _json(content, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=JSON)


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return _json({"error": message}, status, headers)


def create_app(settings: ServeSettings, providers: list[str]) -> FastAPI:
    """The server for `settings`; `providers` come from runtime.resolve_providers (checked once at start-up)."""
    metrics = ServingMetrics()
    in_flight = InFlight()
    # One thread runs every session.run: ONNX Runtime already spreads one run over the cores, and a second
    # concurrent run would only fight it for them.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
    holder = ModelHolder(settings, providers, metrics, executor, in_flight)
    drain = Drain(lambda: [m.batcher.flush() for m in holder.loaded() if m.batcher is not None])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # gRPC beside REST, in this event loop (serve.grpc_port; None = off); a port it cannot bind fails start-up.
        grpc_server = await start_grpc(holder, settings, metrics, in_flight)
        app.state.grpc_port = grpc_server.port if grpc_server else None
        if grpc_server is not None:  # new RPCs are refused as soon as draining starts; those in progress finish
            drain.on_begin(lambda: grpc_server.stop(settings.shutdown_timeout_s))
        # Loading runs in the background: the server is live at once and ready once the champion is warm.
        watcher = asyncio.create_task(watch_champion(holder, settings.reload_poll_s))
        log.info("server started", extra={"event": "started", "host": settings.host, "port": settings.port,
                                          "registry": str(settings.registry), "providers": providers,
                                          "batching": settings.batching, "auth": settings.token is not None})
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests have drained (or shutdown_timeout_s has passed);
            # tuneline.serving.drain began the drain (gRPC's stop among it) when the signal came.
            await drain.finish()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            executor.shutdown(wait=True)
            log.info("server stopped", extra={"event": "stopped", "in_flight": in_flight.count})

    app = FastAPI(title="Tuneline inference server", version=protocol.server_metadata()["version"],
                  summary="Open Inference Protocol (KServe V2) REST with the binary tensor data extension",
                  lifespan=lifespan)
    app.state.holder, app.state.metrics, app.state.settings, app.state.drain = holder, metrics, settings, drain
    generate_openapi = app.openapi
    app.openapi = lambda: schemas.add_components(generate_openapi())  # FastAPI caches the result

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError):
        return _error(exc.status, str(exc), error_headers(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"event": "internal_error", "path": request.url.path})
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    _inference_routes(app, holder)
    _health_routes(app, holder)
    _model_routes(app, holder)
    _repository_routes(app, holder)
    app.add_middleware(Gatekeeper, settings=settings, metrics=metrics, in_flight=in_flight, drain=drain)
    return app


def _inference_routes(app: FastAPI, holder: ModelHolder) -> None:
    """The hot path as plain Starlette routes, first in the router.

    A FastAPI route would solve dependencies for every request and sit behind the other routes in the
    match order. Measured on 2 cores, this took the event loop's CPU per binary request from 0.87 to
    0.56 ms. Their OpenAPI entries come from schemas.add_components.
    """
    async def infer(request: Request) -> Response:
        model = holder.get(request.path_params["name"], request.path_params.get("version"))
        if request.headers.get("content-encoding", "identity") != "identity":
            raise BadRequest(f"Content-Encoding {request.headers['content-encoding']!r} is not supported: send the "
                             "body uncompressed (binary tensors are already compact)")
        body = await request.body()
        parsed = protocol.parse_infer_request(body, request.headers.get(HEADER_LENGTH), model)
        results = await model.batcher.submit(parsed.pixels)
        content, json_length = protocol.encode_infer_response(parsed, model, results)
        if json_length is None:
            return Response(content, media_type=JSON)
        return Response(content, media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(json_length)})

    app.router.routes[0:0] = [_LabelledRoute(path, infer, methods=["POST"]) for path in schemas.INFER_PATHS]


class _LabelledRoute(Route):
    """A Starlette route that, like FastAPI's, records itself in the scope (the metrics label it by path)."""

    def matches(self, scope):
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def _health_routes(app: FastAPI, holder: ModelHolder) -> None:
    @app.get("/v2/health/live", tags=["health"], summary="Server live (200, empty body)")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["health"], summary="Server ready: a champion is loaded and warm (200), "
             "else 503", responses={503: {"model": schemas.Error}})
    async def ready():
        if not holder.ready:
            return _error(503, f"not ready: {holder.last_error or 'loading the champion'}")
        return Response(status_code=200)

    @app.get("/v2", tags=["metadata"], response_model=schemas.ServerMetadata)
    async def server_metadata():
        return _json(protocol.server_metadata())

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics():
        return Response(app.state.metrics.render(), media_type=app.state.metrics.content_type)


def _model_routes(app: FastAPI, holder: ModelHolder) -> None:
    def metadata(name: str, version: str | None) -> Response:
        model = holder.get(name, version)
        versions = sorted({m.version for m in holder.slot(name).loaded()}, key=lambda v: int(v[1:]))
        return _json(protocol.model_metadata(model, versions))

    def model_ready(name: str, version: str | None) -> Response:
        holder.get(name, version)  # NotFound / NotReady
        return Response(status_code=200)

    errors = {400: {"model": schemas.Error}, 404: {"model": schemas.Error}, 503: {"model": schemas.Error}}

    @app.get("/v2/models/{name}", tags=["metadata"], response_model=schemas.ModelMetadata, responses=errors)
    async def model_metadata(name: str):
        return metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=["metadata"], response_model=schemas.ModelMetadata,
             responses=errors)
    async def model_version_metadata(name: str, version: str):
        return metadata(name, version)

    @app.get("/v2/models/{name}/ready", tags=["health"], responses=errors)
    async def ready(name: str):
        return model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["health"], responses=errors)
    async def version_ready(name: str, version: str):
        return model_ready(name, version)

    @app.post("/classify", tags=["inference"], response_model=schemas.Classification, responses=errors,
              openapi_extra={"requestBody": schemas.classify_request_body()},
              summary="Convenience: upload one PNG/JPEG image (multipart field 'file'), in colour or gray at any "
                      "size; get its class name, probability and the top k")
    async def classify(request: Request, version: str | None = None, model: str | None = None, top_k: int = 1):
        served = holder.get(holder.default_name(model), version)
        data, fields = await _uploaded_file(request)
        k = protocol.parse_top_k(fields.get("top_k", top_k), served)
        pixels = decode_image(data, served.spec).astype("float32")
        results = await served.batcher.submit(pixels)
        return _json(protocol.classification(served, results["probabilities"][0], k))


async def _uploaded_file(request: Request) -> tuple[bytes, dict[str, str]]:
    """The image bytes and the other form fields (top_k): multipart/form-data field 'file', or a raw image/png or
    image/jpeg body (no fields)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=4)
        except ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise BadRequest(f"malformed multipart body ({exc})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequest("multipart body has no file field 'file'")
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        return await upload.read(), fields
    if content_type.startswith("image/"):
        return await request.body(), {}
    raise BadRequest(f"send the image as multipart/form-data field 'file' or as an image/png or image/jpeg body "
                     f"(got content-type {content_type or 'none'!r})")


def _repository_routes(app: FastAPI, holder: ModelHolder) -> None:
    async def parameters(request: Request) -> dict:
        body = await request.body()
        if not body.strip():
            return {}
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON ({exc})") from None
        params = doc.get("parameters", {}) if isinstance(doc, dict) else None
        if not isinstance(params, dict):
            raise BadRequest('expected {"parameters": {"version": "v0002"}} or an empty body')
        version = params.get("version")
        if version is not None and not isinstance(version, str):
            raise BadRequest(f"parameters.version must be a string like 'v0002', got {version!r}")
        return params

    @app.post("/v2/repository/index", tags=["repository"], summary="Every model and registry version, and its state")
    async def index():
        holder.refresh()
        entries = []
        for name in holder.names:
            slot = holder.slots[name]
            loaded = {m.version for m in slot.loaded()}
            champion = slot.champion.version if slot.champion else None
            entries += [{"name": name, "version": v, "state": "READY" if v in loaded else "UNAVAILABLE",
                         "reason": "champion" if v == champion else ("loaded" if v in loaded else "not loaded")}
                        for v in slot.registry.versions()]
        return _json(entries)

    @app.post("/v2/repository/models/{name}/load", tags=["repository"], responses={400: {"model": schemas.Error}},
              summary="Reload the model's champion alias (empty body) or load one version by id "
                      '({"parameters": {"version": "v0002"}}); the old model serves until the new one is warm')
    async def load(request: Request, name: str):
        slot = holder.slot(name)  # NotFound for a name the registry does not hold (or serve.model excludes)
        params = await parameters(request)
        previous = slot.champion.version if slot.champion else None
        if params.get("version") is None:
            model = await holder.reload_champion(name, force=True, source="api")
            if model is None:
                raise NotReady(slot.last_error or f"model {name!r} has no champion alias in the registry")
            role = "champion"
        else:
            champion = slot.champion is not None and params["version"] == slot.champion.version
            model = await holder.load(name, params["version"], champion=champion, source="api")
            role = "champion" if champion else "loaded"
        return _json({**model.describe(), "role": role, "previous_champion": previous})

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"], responses={400: {"model": schemas.Error}},
              summary='Unload a non-champion version ({"parameters": {"version": "v0002"}})')
    async def unload(request: Request, name: str):
        holder.slot(name)
        version = (await parameters(request)).get("version")
        if version is None:
            raise BadRequest('unload needs {"parameters": {"version": "v0002"}}; the champion is never unloaded')
        holder.unload(name, version)
        return Response(status_code=200)
