"""Typed errors. The HTTP edge maps each to a status code in one exception handler."""

from __future__ import annotations


class SdServerError(Exception):
    """Base of every error the server raises on purpose. `field` names the request field at fault."""

    status_code = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(SdServerError):
    status_code = 422


class UnknownSampler(InvalidRequest):
    pass


class UnknownScheduler(InvalidRequest):
    pass


class InvalidImage(InvalidRequest):
    pass


class UnsupportedFeature(InvalidRequest):
    """A field whose feature is not implemented, given a non-default value."""


class ModelNotFound(SdServerError):
    status_code = 404


class NoModelAvailable(SdServerError):
    status_code = 503


class ModelLoadError(SdServerError):
    """A checkpoint that can't be loaded: unknown family, missing or mismatched tensors, unsafe pickle."""

    status_code = 422


class UnsafeCheckpoint(ModelLoadError):
    pass


class QueueFull(SdServerError):
    status_code = 503


class OutOfMemory(SdServerError):
    status_code = 507
