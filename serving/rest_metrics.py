"""`GET /metrics`: the data plane's Prometheus metrics, REST and gRPC requests alike."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.responses import Response

from tuneline.serving.dataplane import DataPlane

log = logging.getLogger("tuneline.serving.metrics")


def register(app: FastAPI, dataplane: DataPlane) -> None:
    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics():
        try:  # the drift gauge: the server's score (every worker's window), computed when scraped
            await dataplane.live_summary()
        except Exception:  # noqa: BLE001 - a scrape answers with the rest whatever happens to the drift score
            log.exception("drift score failed", extra={"event": "internal_error", "path": "/metrics"})
        return Response(dataplane.metrics.render(), media_type=dataplane.metrics.content_type)
