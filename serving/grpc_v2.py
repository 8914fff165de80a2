"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), served beside REST.

A grpc.aio server in uvicorn's event loop, started and stopped by the app's lifespan when serve.grpc_port is
set. An adapter over the data plane (serving/dataplane.py) like the REST routes: the models, each model's
batcher (gRPC and REST requests join the same batches), the in-flight count, the bearer token, the size and
concurrency limits, and the validation (tuneline.serving.protocol.check_input / to_rows) are shared, so a
request gets the same answer, or the same error, either way.
ServingError's HTTP status maps to a gRPC code (400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, ...); INTERNAL is
left for real bugs.

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (raw_input_contents or
typed contents in: fp32_contents, uint_contents, or a text model's strings as bytes_contents; raw_output_contents
out, as Triton answers). ModelReady answers ready=false for a model that is unknown or not loaded, as Triton
does: clients use it as a probe.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import grpc
import numpy as np
from fastapi import FastAPI

from tuneline.serving import protocol
from tuneline.serving.admin import PathRedactor
from tuneline.serving.binary import tensor_bytes
from tuneline.serving.challenger import CLIENT_KEY, REQUEST_ID_HEADER, VERSION_HEADER
from tuneline.serving.dataplane import DataPlane
from tuneline.serving.errors import BadRequest, Busy, ServingError, Unauthorized
from tuneline.serving.proto import SERVICE, messages
from tuneline.serving.workers import WORKER_HEADER

log = logging.getLogger("tuneline.serving.grpc")

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # probes work without the token, as on REST
# Where each accepted datatype's values go in typed contents.
TYPED_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


class InferenceService:
    """The RPC implementations; each takes the request message and returns the response message."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane
        self.settings, self.metrics, self.in_flight = dataplane.settings, dataplane.metrics, dataplane.in_flight
        self.m = messages()
        # With serve.workers > 1 the answering worker's pid, in every RPC's trailing metadata (as REST's header).
        self.trailing = ((WORKER_HEADER.lower(), str(os.getpid())),) if self.settings.workers > 1 else ()

    async def ServerLive(self, request):  # the protocol's method names
        return self.m.ServerLiveResponse(live=True)

    async def ServerReady(self, request):
        return self.m.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request):
        return self.m.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request):
        return self.m.ServerMetadataResponse(**self.dataplane.server_metadata())

    async def ModelMetadata(self, request):
        meta = self.dataplane.model_metadata(_model_name(request.name), request.version or None)
        tensor = self.m.ModelMetadataResponse.TensorMetadata
        return self.m.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                            inputs=[tensor(**t) for t in meta["inputs"]],
                                            outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request, context=None):
        if self.in_flight.count >= self.settings.max_concurrency:
            self.metrics.rejected.labels("429").inc()
            raise Busy(f"server busy: {self.in_flight.count} inference requests in flight (serve.max_concurrency); "
                       "retry shortly")
        self.in_flight.count += 1  # the batcher reads it: gRPC requests count as REST ones do
        self.in_flight.arrived(context.peer() if context is not None else None)
        self.metrics.in_flight.inc()
        try:
            key = dict(context.invocation_metadata() or ()).get(CLIENT_KEY) if context is not None else None
            route = self.dataplane.route(_model_name(request.model_name), request.model_version or None, key)
            model = route.model
            rows, texts = _rows(request, model)
            requested = [{"name": o.name, "parameters": {k: _parameter(v) for k, v in o.parameters.items()}}
                         for o in request.outputs]
            outputs = protocol.requested_outputs(requested or None, {})  # the REST checks and messages
            served = await self.dataplane.serve(route, rows, texts)
            results = served.outputs
        finally:
            self.in_flight.count -= 1
            self.metrics.in_flight.dec()
        answer = [(VERSION_HEADER, served.version)]
        if served.ids:
            answer.append((REQUEST_ID_HEADER, ",".join(served.ids)))
        if context is not None:  # sent with the status (as REST's x-tuneline-version header)
            context.set_trailing_metadata((*self.trailing, *answer))
        response = self.m.ModelInferResponse(model_name=model.name, model_version=model.version,
                                             id=request.id or ",".join(served.ids))
        for name, _binary in outputs:  # gRPC answers are always raw bytes: the binary flag is moot
            value = results[name]
            response.outputs.add(name=name, datatype=protocol.OUTPUT_DATATYPES[name], shape=value.shape)
            response.raw_output_contents.append(tensor_bytes(value))
        return response


def _model_name(name: str) -> str:
    if not name:
        raise BadRequest("model name is empty: name the model (ModelMetadata describes its input)")
    return name


def _parameter(value):
    """An InferParameter's value (whichever of its oneof is set)."""
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


def _rows(request, model) -> tuple[np.ndarray, list[str] | None]:
    """The request's one input tensor, checked as REST checks it, as the rows the model's graph takes (and a text
    model's strings as sent)."""
    if len(request.inputs) != 1:
        raise BadRequest(f"inputs must hold the one input {model.input_name!r}; got {len(request.inputs)}")
    tensor = request.inputs[0]
    name, datatype = tensor.name, tensor.datatype
    shape = protocol.check_input(name, datatype, list(tensor.shape), model)  # bounded element count
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise BadRequest(f"raw_input_contents has {len(raw)} entries for 1 input")
        if tensor.HasField("contents"):
            raise BadRequest(f"input {name!r} has both contents and raw_input_contents: send one")
        array = protocol.tensor_from_wire(raw[0], datatype, shape, name)
    else:
        array = _typed(tensor.contents, datatype, shape, name)
    return protocol.to_rows(array, datatype, shape, name, model), protocol.sent_texts(array, model)


def _typed(contents, datatype: str, shape: list[int], name: str):
    field = TYPED_FIELD[datatype]
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise BadRequest(f"input {name!r}: {datatype} values go in contents.{field}, not {', '.join(others)}")
    values, count = getattr(contents, field), math.prod(shape)
    if len(values) != count:
        raise BadRequest(f"input {name!r}: shape {shape} has {count} elements but contents.{field} has "
                         f"{len(values)} (send the tensor there or in raw_input_contents)")
    if datatype == "BYTES":
        return list(values)
    if datatype == "UINT8":
        array = np.fromiter(values, dtype=np.uint32, count=count)
        if count and array.max() > 255:
            raise BadRequest(f"input {name!r}: UINT8 data must be integers 0..255")
        return array.astype(np.uint8).reshape(shape)
    return np.fromiter(values, dtype=np.float32, count=count).reshape(shape)


class _Calls:
    """Wraps each RPC: the token check, ServingError -> gRPC status, the request metrics and access log, and with
    serve.workers > 1 the answering worker's pid in the trailing metadata (as REST's X-Tuneline-Worker header)."""

    def __init__(self, service: InferenceService):
        self.service = service
        token = service.settings.token
        self.token = token.get_secret_value().encode() if token else None
        self.redactor = PathRedactor(service.settings.registry)  # no server paths in client-facing messages
        self.worker = service.trailing or None

    def handler(self, method: str):
        implementation = getattr(self.service, method)
        metrics, settings = self.service.metrics, self.service.settings
        endpoint = f"/{SERVICE}/{method}"

        async def call(request, context: grpc.aio.ServicerContext):
            started, code = time.perf_counter(), grpc.StatusCode.OK
            if self.worker is not None:  # sent with the status, also after an abort
                context.set_trailing_metadata(self.worker)
            try:
                if self.token is not None and method not in OPEN_METHODS:
                    self._authorize(context)
                if method == "ModelInfer":  # sets its own trailing metadata: the worker's, the version's
                    return await implementation(request, context)
                return await implementation(request)
            except ServingError as exc:
                code = CODES.get(exc.status, grpc.StatusCode.INTERNAL)
                await context.abort(code, self.redactor.text(str(exc)))
            except Exception as exc:  # a bug: INTERNAL, with the traceback in the log and not in the answer
                log.exception("unhandled error", extra={"event": "internal_error", "path": endpoint})
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, f"internal error ({type(exc).__name__}); see the server log")
            finally:
                # The HTTP request metrics, labelled method GRPC and the gRPC status code's name.
                elapsed = time.perf_counter() - started
                metrics.requests.labels("GRPC", endpoint, code.name).inc()
                metrics.latency.labels("GRPC", endpoint, code.name).observe(elapsed)
                if settings.access_log:
                    log.info("request", extra={"event": "request", "method": "GRPC", "path": endpoint,
                                               "status": code.name, "ms": round(elapsed * 1e3, 2),
                                               "client": context.peer()})

        return call

    def _authorize(self, context) -> None:
        given = dict(context.invocation_metadata() or ()).get("authorization", "").encode()
        if not given.startswith(b"Bearer ") or not hmac.compare_digest(given[7:].strip(), self.token):
            raise Unauthorized("missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")


def _handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    m, calls = service.m, _Calls(service)
    handlers = {method.name: grpc.unary_unary_rpc_method_handler(
                    calls.handler(method.name),
                    request_deserializer=getattr(m, method.input_type.name).FromString,
                    response_serializer=getattr(m, method.output_type.name).SerializeToString)
                for method in m.service.methods}
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class GrpcServer:
    """A started grpc.aio server and the port it got (serve.grpc_port 0 = any free port)."""

    def __init__(self, server: grpc.aio.Server, port: int):
        self.server, self.port = server, port

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs; let the ones in progress finish for up to `grace_s`."""
        await self.server.stop(grace_s)
        log.info("grpc stopped", extra={"event": "grpc_stopped", "port": self.port})


def register(app: FastAPI, dataplane: DataPlane) -> Callable[[], AbstractAsyncContextManager[None]]:
    """The gRPC listener for the app's lifespan: started with the app (app.state.grpc_port: its port, or None),
    and told to refuse new RPCs as soon as the drain begins (those in progress finish).

    A worker of serve.workers > 1 that joins the shared ports only once ready (app.state.grpc_joins_later, set by
    serving/workers.py) starts it later, by awaiting app.state.start_grpc().
    """
    async def start() -> None:
        server = await start_grpc(dataplane)  # a port it cannot bind fails start-up
        app.state.grpc_port = server.port if server else None
        if server is not None:
            dataplane.drain.on_begin(lambda: server.stop(dataplane.settings.shutdown_timeout_s))

    @contextlib.asynccontextmanager
    async def serving() -> AsyncIterator[None]:
        app.state.grpc_port, app.state.start_grpc = None, start
        if not getattr(app.state, "grpc_joins_later", False):
            await start()
        yield

    return serving


async def start_grpc(dataplane: DataPlane) -> GrpcServer | None:
    """Start the gRPC server in the running event loop; None when serve.grpc_port is not set (null)."""
    settings = dataplane.settings
    if settings.grpc_port is None:
        return None
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),  # the REST body limit; larger: RESOURCE_EXHAUSTED
        ("grpc.max_send_message_length", -1),
        # One process: without SO_REUSEPORT, so a port another server holds fails instead of being shared. Workers
        # (serve.workers > 1) share the port with SO_REUSEPORT; their parent refused a taken one already
        # (serving/workers.py reserves it), as it does serve.port.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ])
    server.add_generic_rpc_handlers((_handlers(InferenceService(dataplane)),))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(f"serve.grpc_port: cannot listen on {address} (in use, or not an address of this machine): "
                      "pick another port, or 0 for any free one")
    await server.start()
    log.info("grpc started", extra={"event": "grpc_started", "host": settings.host, "port": port})
    return GrpcServer(server, port)
