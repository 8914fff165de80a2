"""Stop on SIGTERM without losing a request or a connection: first tell the load balancers, then drain.

uvicorn's own shutdown closes the listener and every idle keep-alive connection at once, waits up to
`timeout_graceful_shutdown` for busy ones, then cancels what is left, which then gets a plain-text 500.
Measured under load (issue 16), that reset requests that had just been sent on idle keep-alive
connections, and answered the rest of a short drain with text/plain 500s. And a listener closed while
/v2/health/ready still said 200 reset every connection a client opened before its load balancer noticed
(issue 25: 48 clients, a new connection per request: 33-41 resets per SIGTERM). So on SIGTERM:

0. readiness answers 503 at once (REST /v2/health/ready and model ready, gRPC ServerReady and ModelReady;
   liveness stays 200), and for serve.drain_delay_s the server keeps accepting and answering as before, each
   REST answer saying `Connection: close` so keep-alive clients reconnect through their load balancer. A
   second SIGTERM/SIGINT skips the rest of this delay (and only that); a server not listening yet (a worker
   still loading) has nobody to tell and skips it. Then the drain:
1. marks the server draining: every batcher dispatches at once (nobody new is coming to join a batch),
   gRPC stops taking new RPCs (those in progress finish), every REST answer says `Connection: close`;
2. lets the accept backlog in, closes the listener, and keeps idle keep-alive connections open for a
   short linger, so a request already on its way on one is answered (with `Connection: close`)
   instead of reset;
3. hands over to uvicorn's drain for what is left of serve.shutdown_timeout_s; a request cancelled when
   that runs out is answered 503 in JSON by the Gatekeeper (serving/middleware.py), never a text 500.

serve.shutdown_timeout_s counts from the end of the delay: a stop takes at most drain_delay_s +
shutdown_timeout_s (what a supervisor's grace period must exceed: infra/k8s/20-serving.yaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import uvicorn

log = logging.getLogger("tuneline.serving.drain")

LINGER_S = 0.5  # longest an idle keep-alive connection stays open once draining starts (capped at 1/4 of the drain)
DELAY_POLL_S = 0.05  # how often the drain delay checks for a second signal


class Drain:
    """The server's stopping state, shared by REST (the Gatekeeper), gRPC, the data plane's readiness and the
    batchers: `announced` from the signal on (not ready, still serving), `draining` from the end of the delay."""

    def __init__(self, flush_batchers: Callable[[], None], delay_s: float = 0.0):
        self.flush_batchers = flush_batchers
        self.delay_s = delay_s  # serve.drain_delay_s
        self.announced_at: float | None = None  # time.monotonic() of the stop signal
        self.hurried = False
        self.draining = False
        self.started: float | None = None
        self._hooks: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task] = []

    @property
    def announced(self) -> bool:
        """The server is stopping: readiness answers 503 (it may still be serving: see `draining`)."""
        return self.announced_at is not None

    def announce(self) -> None:
        """Say not ready from now on (idempotent). Safe in a signal handler: it only sets an attribute."""
        if self.announced_at is None:
            self.announced_at = time.monotonic()

    def hurry(self) -> None:
        """End the delay now (a second stop signal). Safe in a signal handler."""
        self.hurried = True

    async def wait_delay(self) -> None:
        """Announce, then keep serving until serve.drain_delay_s after the announcement, or a hurry()."""
        self.announce()
        log.info("not ready", extra={"event": "not_ready", "drain_delay_s": self.delay_s})
        deadline = self.announced_at + self.delay_s
        while not self.hurried and (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(DELAY_POLL_S, left))

    def on_begin(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook()` (a coroutine, e.g. the gRPC server's stop) as soon as draining starts."""
        self._hooks.append(hook)

    def begin(self) -> None:
        """Start draining (idempotent; called in the event loop)."""
        if self.draining:
            return
        self.announce()
        self.draining, self.started = True, time.monotonic()
        self.flush_batchers()
        self._tasks = [asyncio.ensure_future(hook()) for hook in self._hooks]
        log.info("draining", extra={"event": "draining"})

    async def finish(self) -> None:
        """Wait for the hooks (the lifespan's shutdown calls this; it begins the drain if nothing else did)."""
        self.begin()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        for _ in range(3):  # let requests cancelled by uvicorn's deadline write their 503s before the loop ends
            await asyncio.sleep(0)


def _idle(connection) -> bool:
    cycle = getattr(connection, "cycle", None)
    return cycle is None or cycle.response_complete


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose stop goes as the module docstring says; the app must have app.state.drain."""

    @property
    def drain(self) -> Drain | None:
        return getattr(getattr(self.config.app, "state", None), "drain", None)

    def handle_exit(self, sig: int, frame) -> None:
        """uvicorn's signal handler: a first signal makes the server unready at once (the main loop notices
        should_exit only at its next 0.1 s tick); a second one during the delay ends the delay, and nothing
        else (uvicorn would take a second SIGINT as "skip the drain"; later, during the drain, it still does)."""
        drain = self.drain
        if drain is not None and drain.announced and not drain.draining and not self.force_exit:
            drain.hurry()
            return
        if drain is not None:
            drain.announce()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        drain = self.drain
        if drain is not None and not self.force_exit and self.servers:  # servers: the listeners, if any yet
            await drain.wait_delay()  # unready, still serving: the load balancers stop sending
        total = self.config.timeout_graceful_shutdown
        started = time.monotonic()  # serve.shutdown_timeout_s counts from the end of the delay
        if drain is not None and not self.force_exit:
            drain.begin()
            await asyncio.sleep(0)  # one loop turn: connections already in the accept backlog are accepted
            for server in self.servers:
                server.close()  # no new connections
            linger = LINGER_S if total is None else min(LINGER_S, total / 4)
            while time.monotonic() - started < linger and any(_idle(c) for c in self.server_state.connections):
                await asyncio.sleep(0.02)
        if total is not None:  # the rest of the drain allowance goes to uvicorn's wait
            self.config.timeout_graceful_shutdown = max(0.0, total - (time.monotonic() - started))
        try:
            await super().shutdown(sockets)
        finally:
            self.config.timeout_graceful_shutdown = total
