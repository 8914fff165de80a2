"""One ASGI middleware in front of every route: bearer auth, body size limit, concurrency limit (429),
request metrics and the access log.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which costs a task and a stream per request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter, deque

import orjson

from tuneline.serving.admin import PathRedactor, admin_refusal, is_admin_route
from tuneline.serving.errors import Busy, NotReady, PayloadTooLarge, ServingError, Unauthorized
from tuneline.serving.metrics import ServingMetrics
from tuneline.serving.settings import ServeSettings

log = logging.getLogger("tuneline.serving.access")

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # probes work without the token


ONE_CLIENT_WINDOW = 32  # the last inference requests InFlight.one_client looks at
ONE_CLIENT_SHARE = 28  # ...of which this many over one connection make the traffic one client's (a monitor's or a
                       # second client's occasional request does not end it; 64 clients' traffic never has it)


class InFlight:
    """Inference requests being handled right now (read by the batcher and the 429 check), and whether the traffic
    is one client's: the batcher runs a lone request on the event loop only then (serving/batcher.py)."""

    def __init__(self) -> None:
        self.count = 0
        self._recent: deque = deque()  # the connections of the last ONE_CLIENT_WINDOW inference requests
        self._per_connection: Counter = Counter()  # how many of them each connection sent

    def __call__(self) -> int:
        return self.count

    def arrived(self, connection: object) -> None:
        """An inference request came over `connection` (REST: the ASGI scope's client address and port, gRPC: the
        peer; None: unknown, which never counts as one client)."""
        connection = object() if connection is None else connection
        self._recent.append(connection)
        self._per_connection[connection] += 1
        if len(self._recent) > ONE_CLIENT_WINDOW:
            old = self._recent.popleft()
            self._per_connection[old] -= 1
            if not self._per_connection[old]:
                del self._per_connection[old]

    def one_client(self) -> bool:
        """ONE_CLIENT_SHARE of the last ONE_CLIENT_WINDOW inference requests came over one connection. A lone request
        in a lull of many clients' traffic is not one client's: running those on the loop turned 64-connection p99s
        after a one-client period into 110-490 ms in 3 of 4 server starts (docs/benchmarks.md)."""
        return len(self._recent) >= ONE_CLIENT_WINDOW and max(self._per_connection.values()) >= ONE_CLIENT_SHARE


def is_inference(method: str, path: str) -> bool:
    return method == "POST" and (path.endswith("/infer") or path == "/classify")


class Gatekeeper:
    def __init__(self, app, settings: ServeSettings, metrics: ServingMetrics, in_flight: InFlight, drain=None):
        self.app, self.settings, self.metrics, self.in_flight = app, settings, metrics, in_flight
        self.drain = drain  # tuneline.serving.drain.Drain: once the server is stopping, answers close their connection
        self.token = settings.token.get_secret_value().encode() if settings.token else None
        self.admin_token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
        self.redactor = PathRedactor(settings.registry)
        self._metric_children: dict[tuple, tuple] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        status = 500  # what the metrics record if the app dies before answering
        answered = False

        held_start = None  # an error answer's start, held until its body is known (see _redacted)

        async def send_recording(message):
            nonlocal status, answered, held_start
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                # Stopping: the client must not reuse this connection (its next one goes through its load balancer).
                if self.drain is not None and self.drain.announced:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                if status >= 400:
                    held_start = message
                    return
            elif held_start is not None and message["type"] == "http.response.body":
                start, held_start = held_start, None
                message = {**message, "body": self.redactor.body(message.get("body", b""))}
                await send(_with_length(start, len(message["body"])) if not message.get("more_body") else start)
            await send(message)

        inference = is_inference(method, path)
        counted = False
        try:
            refusal = self._refusal(scope, path, inference)
            if refusal is not None:
                self.metrics.rejected.labels(str(refusal.status)).inc()
                await _reply(send_recording, refusal)
                return
            if inference:
                self.in_flight.count += 1
                self.in_flight.arrived(scope.get("client"))
                self.metrics.in_flight.inc()
                counted = True
            await self.app(scope, self._limited(receive), send_recording)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when serve.shutdown_timeout_s runs out: answer it in JSON
            # (uvicorn's own answer would be a text/plain 500) and end normally.
            if self.drain is None or not self.drain.draining or answered:
                raise
            self.metrics.rejected.labels("503").inc()
            await _reply(send_recording, NotReady(
                f"server shutting down: the drain time (serve.shutdown_timeout_s = {self.settings.shutdown_timeout_s:g} s) "
                "ran out before this request finished; retry it"))
        finally:
            if counted:
                self.in_flight.count -= 1
                self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            requests, latency = self._children(method, getattr(scope.get("route"), "path", None), status)
            requests.inc()
            latency.observe(elapsed)
            if self.settings.access_log:
                log.info("request", extra={"event": "request", "method": method, "path": path, "status": status,
                                           "ms": round(elapsed * 1e3, 2), "client": (scope.get("client") or ("?",))[0]})

    def _children(self, method: str, endpoint: str | None, status: int) -> tuple:
        """The request counter's and latency histogram's children for these labels (`.labels()` once per kind of
        request, not per request)."""
        key = (method, endpoint, status)
        children = self._metric_children.get(key)
        if children is None:
            labels = (method, endpoint or "(unmatched)", str(status))
            children = self._metric_children[key] = (self.metrics.requests.labels(*labels),
                                                     self.metrics.latency.labels(*labels))
        return children

    def _refusal(self, scope, path: str, inference: bool) -> ServingError | None:
        headers = dict(scope["headers"])
        admin = is_admin_route(scope["method"], path)
        if admin:
            refusal = admin_refusal((scope.get("client") or (None,))[0], headers.get(b"authorization", b""),
                                    self.admin_token)
            if refusal is not None:
                return refusal
        if self.token is not None and path not in OPEN_PATHS and not (admin and self.admin_token is not None):
            given = headers.get(b"authorization", b"")
            if not given.startswith(b"Bearer ") or not hmac.compare_digest(given[7:].strip(), self.token):
                return Unauthorized("missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return PayloadTooLarge(f"request body of {int(length)} bytes exceeds serve.max_body_bytes "
                                   f"({self.settings.max_body_bytes}): send fewer images per request")
        if inference and self.in_flight.count >= self.settings.max_concurrency:
            return Busy(f"server busy: {self.in_flight.count} inference requests in flight "
                        f"(serve.max_concurrency); retry shortly")
        return None

    def _limited(self, receive):
        """receive() that refuses a body growing past the limit (chunked uploads carry no Content-Length)."""
        limit, seen = self.settings.max_body_bytes, 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body exceeds serve.max_body_bytes ({limit})")
            return message

        return receive_limited


def _with_length(start: dict, length: int) -> dict:
    """The start message with its Content-Length set to `length` (the body was redacted)."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    return {**start, "headers": [*headers, (b"content-length", str(length).encode())]}


def error_headers(exc: ServingError) -> dict[str, str]:
    if isinstance(exc, Unauthorized):
        return {"www-authenticate": "Bearer"}
    if isinstance(exc, Busy):
        return {"retry-after": "1"}
    return {}


async def _reply(send, exc: ServingError) -> None:
    body = orjson.dumps({"error": str(exc)})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error_headers(exc).items()]
    if isinstance(exc, PayloadTooLarge):
        headers.append((b"connection", b"close"))  # the unread body would otherwise be parsed as a next request
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
