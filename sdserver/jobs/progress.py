"""Progress snapshots: immutable views of the worker's state that HTTP handlers read without locking the worker."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ProgressSnapshot:
    """What the A1111 `/progress` route (and the native job API) reports.

    `job_count` counts the running job's passes plus every queued job, so clients that wait for
    `job_count == 0` wait for the whole queue, as they do against A1111.
    """

    job: str = ""  # "scripts_txt2img" style name of the running job kind, "" when idle
    job_id: str | None = None
    job_count: int = 0
    job_no: int = 0  # index of the current pass (batch) within the running job
    sampling_step: int = 0
    sampling_steps: int = 0
    job_timestamp: str = "0"  # "YYYYMMDDHHMMSS" of the running job's start
    started_at: float | None = None  # time.monotonic() at the running job's start
    queued: int = 0
    interrupted: bool = False
    skipped: bool = False
    stopping_generation: bool = False
    current_image: Image.Image | None = None
    textinfo: str | None = None

    @property
    def active(self) -> bool:
        return self.job_id is not None

    def fraction(self) -> float:
        """A1111's formula: 0.01 + job_no/job_count + step share of the current pass, capped at 1."""
        if self.job_count <= 0 or not self.active:
            return 0.0
        passes = max(self.job_count - self.queued, 1)
        value = self.job_no / passes
        if self.sampling_steps > 0:
            value += (1 / passes) * (self.sampling_step / self.sampling_steps)
        return min(0.01 + value, 1.0)
