"""The loop's REST routes: `GET /v2/live` (and `/v2/live/{model}`), the champion's and challenger's live numbers and
the drift score; `POST /v2/feedback`, a true label for a captured row (serve.capture).

GET /v2/live/{model} answers one model's summary (the contract `tuneline models promote --live` and the retraining
deployment read; docs/serving.md):

    {"model", "mode": off | shadow | canary,
     "champion":   {"version", "requests", "errors", "error_rate", "latency_ms": {"p50", "p99"}, "mean_confidence",
                    "class_counts": {label: rows}, ["labelled", "labelled_accuracy"]},
     "challenger": null | {the same, "agreement", "compared", "dropped"},
     "drift": {"score", "threshold", "window", "size", "drifted", "features": {name: psi}, "profile": bool}}

GET /v2/live answers {"models": [one summary per served model]}. With serve.workers > 1 the numbers are the
server's: every worker's, merged by the worker that answers (serving/siblings.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from tuneline.serving import schemas
from tuneline.serving.dataplane import DataPlane
from tuneline.serving.rest_v2 import json_response


def register(app: FastAPI, dataplane: DataPlane) -> None:
    errors = {400: {"model": schemas.Error}, 404: {"model": schemas.Error}}

    @app.get("/v2/live", tags=["operations"], summary="Live numbers of every served model: champion and challenger "
             "(requests, errors, latency, confidence, classes, shadow agreement) and the drift score")
    async def live_all():
        return json_response({"models": await dataplane.live_summary()})

    @app.get("/v2/live/{name}", tags=["operations"], responses=errors,
             summary="Live numbers of one model: champion, challenger, drift (the contract promote --live reads)")
    async def live_one(name: str):
        return json_response((await dataplane.live_summary(name))[0])

    @app.post("/v2/feedback", tags=["operations"], responses=errors,
              openapi_extra={"requestBody": schemas.feedback_request_body()},
              summary='A true label for a captured row (serve.capture): {"id": <x-tuneline-request-id>, "label": '
                      '<class index>}; 404 while the capture is off')
    async def feedback(request: Request):
        return json_response(dataplane.feedback(await request.body()))
