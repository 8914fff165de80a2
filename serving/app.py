"""The server, composed: one data plane, the protocol adapters registered on it, the middleware, the lifespan.

Each protocol is a module with `register(app, dataplane)` (serving/dataplane.py has the logic; the module
decodes its wire format, calls the data plane and encodes the answer). A register that returns something
returns a listener of its own (gRPC's port) as an async context manager factory, entered for the app's life.
Adding a protocol is one module and one entry in PROTOCOLS.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from tuneline.serving import classify, grpc_v2, rest_live, rest_metrics, rest_repository, rest_v2, schemas
from tuneline.serving.dataplane import DataPlane
from tuneline.serving.errors import ServingError
from tuneline.serving.logs import stop_logging
from tuneline.serving.middleware import Gatekeeper
from tuneline.serving.rest_v2 import error_answer, error_response
from tuneline.serving.settings import ServeSettings

log = logging.getLogger("tuneline.serving.app")

# rest_v2 first: it puts the inference routes at the head of the router (the hot path matches first).
PROTOCOLS = (rest_v2, classify, rest_repository, rest_live, rest_metrics, grpc_v2)


def create_app(settings: ServeSettings, providers: list[str]) -> FastAPI:
    """The server for `settings`; `providers` come from runtime.resolve_providers (checked once at start-up)."""
    dataplane = DataPlane(settings, providers)
    listeners = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with contextlib.AsyncExitStack() as stack:
            for listener in listeners:  # gRPC beside REST, in this event loop (serve.grpc_port; None = off)
                await stack.enter_async_context(listener())
            dataplane.start()  # loading runs in the background: live at once, ready once the champion is warm
            log.info("server started", extra={"event": "started", "host": settings.host, "port": settings.port,
                                              "registry": str(settings.registry), "providers": providers,
                                              "batching": settings.batching, "auth": settings.token is not None})
            try:
                yield
            finally:
                # uvicorn calls this after in-flight requests have drained (or shutdown_timeout_s has passed);
                # tuneline.serving.drain began the drain (gRPC's stop among it) when the signal came.
                await dataplane.stop()
                log.info("server stopped", extra={"event": "stopped", "in_flight": dataplane.in_flight.count})
                stop_logging()  # write every queued line now: the process may end by a re-raised signal

    app = InferenceServer(title="Tuneline inference server", version=dataplane.server_metadata()["version"],
                  summary="Open Inference Protocol (KServe V2) REST with the binary tensor data extension",
                  lifespan=lifespan)
    app.state.dataplane = dataplane
    # What tests, workers (serving/workers.py) and the drain (serving/drain.py) read off the app.
    app.state.holder, app.state.metrics, app.state.drain = dataplane.holder, dataplane.metrics, dataplane.drain
    app.state.settings = settings
    generate_openapi = app.openapi
    app.openapi = lambda: schemas.add_components(generate_openapi())  # FastAPI caches the result
    _error_handlers(app)
    for protocol in PROTOCOLS:
        listener = protocol.register(app, dataplane)
        if listener is not None:
            listeners.append(listener)
    gatekeeper = dict(settings=settings, metrics=dataplane.metrics, in_flight=dataplane.in_flight, drain=dataplane.drain)
    app.add_middleware(Gatekeeper, **gatekeeper)
    app.hot_path = (app.state.inference.match, Gatekeeper(app.state.inference, **gatekeeper))
    return app


class InferenceServer(FastAPI):
    """FastAPI, with inference requests answered ahead of its middleware stack (rest_v2.InferenceEndpoint says why).

    `hot_path` is (match, app): `match(scope)` says whether a request is an inference request (and sets its route),
    and `app` answers it: the bare endpoint behind a Gatekeeper of its own. Every other request, and every request
    when hot_path is None, goes through FastAPI as usual.
    """

    hot_path: tuple | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.hot_path is not None and self.hot_path[0](scope):
            scope["app"] = self
            await self.hot_path[1](scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _error_handlers(app: FastAPI) -> None:
    """Every error a REST route raises becomes {"error": message} with its status."""
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError):
        return error_answer(exc, request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return error_answer(exc, request.url.path)
