"""`POST /classify`: one upload in, its class name, probability and top k out (REST).

What is uploaded follows the model's modality: a PNG/JPEG image, a WAV/FLAC/OGG clip of any sample rate and channel
count, or UTF-8 text (a .txt file or a text/plain body). A multipart field 'file' is read as the model's modality
takes it, whatever its declared type; a raw body's Content-Type must be one the model takes (else 415).
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from tuneline.serving import schemas
from tuneline.serving.dataplane import DataPlane
from tuneline.serving.errors import BadRequest, ServingError
from tuneline.serving.inputs import check_upload_type
from tuneline.serving.model_holder import LoadedModel
from tuneline.serving.challenger import CLIENT_KEY
from tuneline.serving.rest_v2 import answer_headers, json_response


def register(app: FastAPI, dataplane: DataPlane) -> None:
    errors = {400: {"model": schemas.Error}, 404: {"model": schemas.Error}, 415: {"model": schemas.Error},
              503: {"model": schemas.Error}}

    @app.post("/classify", tags=["inference"], response_model=schemas.Classification, responses=errors,
              openapi_extra={"requestBody": schemas.classify_request_body()},
              summary="Convenience: upload one file (multipart field 'file', or a raw body): a PNG/JPEG image in "
                      "colour or gray at any size, a WAV/FLAC/OGG clip at any rate, or UTF-8 text, as the model "
                      "takes; get its class name, probability and the top k")
    async def classify(request: Request, version: str | None = None, model: str | None = None, top_k: int = 1):
        # An unknown model is a 404 before the body is read; the route (champion, or a canary's challenger) is chosen
        # by the client key as for V2 inference.
        route = dataplane.classify_model(model, version, request.headers.get(CLIENT_KEY))
        data, fields = await uploaded_file(request, route.model)
        answer, served = await dataplane.classify(route, data, fields.get("top_k", top_k))
        return json_response(answer, headers=answer_headers(served))


async def uploaded_file(request: Request, model: LoadedModel) -> tuple[bytes, dict[str, str]]:
    """The upload's bytes and the other form fields (top_k): multipart/form-data field 'file', or a raw body of a
    type the model takes (image/png or image/jpeg, audio/wav, audio/flac or audio/ogg, text/plain: no fields)."""
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
    check_upload_type(content_type, model)  # 415 naming what this model takes
    return await request.body(), {}
