"""Errors the job layer raises to its callers."""

from __future__ import annotations

from sdserver.errors import InvalidRequest, SdServerError


class JobCancelled(SdServerError):
    """Waited for a job that was cancelled (by DELETE, a client hang-up or shutdown) before it finished."""

    status_code = 409


class UnknownJob(SdServerError):
    """No job with that id: never submitted, or its result outlived the job TTL."""

    status_code = 404


class DuplicateJobId(InvalidRequest):
    """A caller-chosen job id that names a job still queued or running."""
