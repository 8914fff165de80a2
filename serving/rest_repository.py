"""The V2 model repository extension over REST: index, load and unload (load/unload are admin routes:
serving/admin.py says who may call them).

With serve.workers > 1 a load or unload is applied by every worker before it is answered (serving/siblings.py);
the index is the answering worker's, the same as every other's once they all applied the same loads.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from tuneline.serving import schemas
from tuneline.serving.dataplane import DataPlane
from tuneline.serving.errors import BadRequest, NotFound
from tuneline.serving.rest_v2 import json_response
from tuneline.serving.siblings import Answer


async def _parameters(request: Request) -> dict:
    """The body's {"parameters": {...}}; an empty body is no parameters."""
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


async def _everywhere(app: FastAPI, op: str, name: str, version: str | None) -> list[Answer]:
    """Have the other workers apply what this one just did (serve.workers > 1; nothing with one process): their
    answers, once every one applied it (else NotAppliedEverywhere, a 500 naming those that did not)."""
    siblings = getattr(app.state, "siblings", None)  # serving/workers.py sets it in each worker
    return [] if siblings is None else await siblings.apply(op, name, version)


def register(app: FastAPI, dataplane: DataPlane) -> None:
    @app.post("/v2/repository/index", tags=["repository"], summary="Every model and registry version, and its state")
    async def index():
        return json_response(dataplane.index())

    @app.post("/v2/repository/models/{name}/load", tags=["repository"], responses={400: {"model": schemas.Error}},
              summary="Reload the model's champion alias (empty body) or load one version by id "
                      '({"parameters": {"version": "v0002"}}); the old model serves until the new one is warm')
    async def load(request: Request, name: str):
        dataplane.check_model(name)  # an unknown name is a 404 before the body is read
        version = (await _parameters(request)).get("version")
        loaded = await dataplane.load(name, version)
        await _everywhere(app, "load", name, version)
        return json_response(loaded)

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"], responses={400: {"model": schemas.Error}},
              summary='Unload a non-champion version ({"parameters": {"version": "v0002"}})')
    async def unload(request: Request, name: str):
        dataplane.check_model(name)
        version = (await _parameters(request)).get("version")
        if version is None:
            raise BadRequest('unload needs {"parameters": {"version": "v0002"}}; the champion is never unloaded')
        try:
            dataplane.unload(name, version)
        except NotFound:
            # Not loaded here. After an unload another worker failed to apply, it may still be loaded there: the
            # retry unloads it wherever it is, and is a 404 only when no worker had it.
            if not any(answer.status == 200 for answer in await _everywhere(app, "unload", name, version)):
                raise
            return Response(status_code=200)
        await _everywhere(app, "unload", name, version)
        return Response(status_code=200)
