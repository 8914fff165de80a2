"""`GET /metrics`: the data plane's Prometheus metrics, REST and gRPC requests alike."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import Response

from tuneline.serving.dataplane import DataPlane


def register(app: FastAPI, dataplane: DataPlane) -> None:
    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics():
        return Response(dataplane.metrics.render(), media_type=dataplane.metrics.content_type)
