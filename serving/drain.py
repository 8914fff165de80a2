"""Lossless drain on SIGTERM: every request whose bytes the server has read gets its answer, or a JSON 503.

uvicorn's own shutdown closes the listener and every idle keep-alive connection at once, waits up to
`timeout_graceful_shutdown` for busy ones, then cancels what is left, which then gets a plain-text 500.
Measured under load (issue 16), that reset requests that had just been sent on idle keep-alive
connections, and answered the rest of a short drain with text/plain 500s. Here the drain:

1. marks the server draining: every batcher dispatches at once (nobody new is coming to join a batch),
   gRPC stops taking new RPCs (those in progress finish), every REST answer says `Connection: close`;
2. lets the accept backlog in, closes the listener, and keeps idle keep-alive connections open for a
   short linger, so a request already on its way on one is answered (with `Connection: close`)
   instead of reset;
3. hands over to uvicorn's drain for what is left of serve.shutdown_timeout_s; a request cancelled when
   that runs out is answered 503 in JSON by the Gatekeeper (serving/middleware.py), never a text 500.
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


class Drain:
    """The server's draining state, shared by REST (the Gatekeeper), gRPC and the batchers."""

    def __init__(self, flush_batchers: Callable[[], None]):
        self.flush_batchers = flush_batchers
        self.draining = False
        self.started: float | None = None
        self._hooks: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task] = []

    def on_begin(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook()` (a coroutine, e.g. the gRPC server's stop) as soon as draining starts."""
        self._hooks.append(hook)

    def begin(self) -> None:
        """Start draining (idempotent; called in the event loop)."""
        if self.draining:
            return
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
    """uvicorn.Server whose shutdown drains as the module docstring says; the app must have app.state.drain."""

    async def shutdown(self, sockets=None) -> None:
        drain: Drain | None = getattr(getattr(self.config.app, "state", None), "drain", None)
        total = self.config.timeout_graceful_shutdown
        started = time.monotonic()
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
