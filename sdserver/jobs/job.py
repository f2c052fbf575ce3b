"""Job records: the mutable record the queue owns, and the frozen `JobInfo` view everyone else reads."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from sdserver.engine.types import Engine, GenerationRequest, JobControl

Work = Callable[[Engine, JobControl], Any]
"""What a job does, run on the worker thread that owns the engine."""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(enum.StrEnum):
    GENERATE = "generate"
    LOAD_CHECKPOINT = "load_checkpoint"
    REFRESH = "refresh"
    UNLOAD = "unload"
    RELOAD = "reload"
    CALL = "call"  # any other engine work that must be serialised with generations


@dataclass(frozen=True)
class JobInfo:
    """An immutable view of one job at one moment."""

    id: str
    kind: JobKind
    name: str
    state: JobState
    version: int  # bumps on every change, so watchers can tell "nothing new" cheaply
    created_at: float
    started_at: float | None
    finished_at: float | None
    timestamp: str  # wall-clock "YYYYMMDDHHMMSS" of submission, A1111's job_timestamp
    queue_position: int | None  # 0 = next to run; None unless queued
    job_no: int
    pass_count: int
    sampling_step: int
    sampling_steps: int
    preview: Image.Image | None
    preview_id: int  # bumps with every new preview
    interrupted: bool
    skipped: bool
    result: Any = None
    error: BaseException | None = None
    request: GenerationRequest | None = None
    context: Any = None  # whatever the submitter attached (the HTTP edge keeps its original request here)

    def fraction(self) -> float:
        """Share of the job done, 0..1, without A1111's 0.01 offset."""
        if self.state is JobState.SUCCEEDED:
            return 1.0
        if self.state is not JobState.RUNNING or self.pass_count <= 0:
            return 0.0
        value = self.job_no / self.pass_count
        if self.sampling_steps > 0:
            value += (self.sampling_step / self.sampling_steps) / self.pass_count
        return min(value, 1.0)

    def eta(self, now: float) -> float | None:
        """Seconds left, extrapolated from the elapsed time; None before any progress."""
        done = self.fraction()
        if self.started_at is None or done <= 0.0:
            return None
        elapsed = max(now - self.started_at, 0.0)
        return max(elapsed / done - elapsed, 0.0)


@dataclass(eq=False)
class Job:
    """The queue's own record of a job. Mutated only under the queue's lock."""

    id: str
    kind: JobKind
    name: str
    work: Work
    created_at: float
    timestamp: str
    pass_count: int = 1
    request: GenerationRequest | None = None
    context: Any = None
    state: JobState = JobState.QUEUED
    version: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    preview: Image.Image | None = None
    preview_id: int = 0
    interrupted: bool = False
    skipped: bool = False
    cancel_requested: bool = False
    result: Any = None
    error: BaseException | None = None
    on_done: list[Callable[[JobInfo], None]] = field(default_factory=list)

    def touch(self) -> None:
        self.version += 1

    def view(self, queue_position: int | None = None) -> JobInfo:
        return JobInfo(
            id=self.id,
            kind=self.kind,
            name=self.name,
            state=self.state,
            version=self.version,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            timestamp=self.timestamp,
            queue_position=queue_position,
            job_no=self.job_no,
            pass_count=self.pass_count,
            sampling_step=self.sampling_step,
            sampling_steps=self.sampling_steps,
            preview=self.preview,
            preview_id=self.preview_id,
            interrupted=self.interrupted,
            skipped=self.skipped,
            result=self.result,
            error=self.error,
            request=self.request,
            context=self.context,
        )
