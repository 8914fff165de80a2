"""Typed serving errors, each carrying the HTTP status it maps to (body: {"error": message})."""

from __future__ import annotations


class ServingError(Exception):
    """Base: a request the server answers with `status` and {"error": str(self)}."""

    status = 500


class BadRequest(ServingError):
    """Malformed request: shape, datatype, size mismatch, NaN, unknown output, undecodable image."""

    status = 400


class Unauthorized(ServingError):
    status = 401


class NotFound(ServingError):
    """Unknown model name or version."""

    status = 404


class Conflict(ServingError):
    """A well-formed request that the server's state refuses: unloading the champion."""

    status = 409


class PayloadTooLarge(ServingError):
    """A body over serve.max_body_bytes, a clip longer than serve.max_audio_s, a text row over MAX_TEXT_BYTES."""

    status = 413


class UnsupportedMediaType(ServingError):
    """A /classify body whose Content-Type the model does not take (an image to a speech model, ...)."""

    status = 415


class Busy(ServingError):
    """Too many inference requests in flight (serve.max_concurrency)."""

    status = 429


class NotReady(ServingError):
    """No model loaded yet, or the version exists but is not loaded."""

    status = 503


class LoadError(ServingError):
    """A model version could not be loaded; `reason` is a short label for the metric (checksum, corrupt, …)."""

    status = 400

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Forbidden(ServingError):
    """An admin route (repository load/unload) from a client it is not open to."""

    status = 403
