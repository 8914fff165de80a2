"""`POST /classify`: one uploaded PNG/JPEG image in, its class name, probability and top k out (REST)."""

from __future__ import annotations

from fastapi import FastAPI, Request

from tuneline.serving import schemas
from tuneline.serving.dataplane import DataPlane
from tuneline.serving.errors import BadRequest, ServingError
from tuneline.serving.rest_v2 import json_response


def register(app: FastAPI, dataplane: DataPlane) -> None:
    errors = {400: {"model": schemas.Error}, 404: {"model": schemas.Error}, 503: {"model": schemas.Error}}

    @app.post("/classify", tags=["inference"], response_model=schemas.Classification, responses=errors,
              openapi_extra={"requestBody": schemas.classify_request_body()},
              summary="Convenience: upload one PNG/JPEG image (multipart field 'file'), in colour or gray at any "
                      "size; get its class name, probability and the top k")
    async def classify(request: Request, version: str | None = None, model: str | None = None, top_k: int = 1):
        served = dataplane.classify_model(model, version)  # an unknown model is a 404 before the body is read
        data, fields = await uploaded_file(request)
        return json_response(await dataplane.classify(served, data, fields.get("top_k", top_k)))


async def uploaded_file(request: Request) -> tuple[bytes, dict[str, str]]:
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
