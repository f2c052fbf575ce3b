"""The `JobControl` the engine sees: it records progress into the job and raises when asked to stop."""

from __future__ import annotations

import threading
from typing import Callable

from PIL import Image

from sdserver.engine.types import Interrupted, Skipped
from sdserver.jobs.job import Job

PreviewEvery = Callable[[], int]
"""Returns A1111's `show_progress_every_n_steps`: N > 0 every N steps, -1 only at the end of a pass, 0 never."""


def wants_preview(every: int, step: int, steps: int) -> bool:
    """Whether the (0-based) `step` of a pass of `steps` steps should produce a live preview."""
    if every > 0:
        return (step + 1) % every == 0
    if every == -1:
        return steps > 0 and step + 1 >= steps
    return False


class WorkerControl:
    """JobControl for one running job. Called on the worker thread; state lives in the job under `lock`.

    `step(i)` takes the 0-based index of the step just finished, so `sampling_step` reads i+1 of `steps`.
    """

    def __init__(self, job: Job, lock: threading.Lock, preview_every: PreviewEvery) -> None:
        self._job = job
        self._lock = lock
        self._preview_every = preview_every

    def begin_pass(self, batch_index: int, batch_count: int, steps: int) -> None:
        with self._lock:
            job = self._job
            self._raise_if_stopped(job, skippable=False)
            job.skipped = False  # A1111: a skip ends only the pass it was asked in
            job.job_no = batch_index
            job.pass_count = max(batch_count, batch_index + 1, 1)
            job.sampling_step = 0
            job.sampling_steps = steps
            job.touch()

    def step(self, step: int, preview: Callable[[], Image.Image] | None) -> None:
        with self._lock:
            job = self._job
            self._raise_if_stopped(job, skippable=True)
            total = job.sampling_steps
            job.sampling_step = min(step + 1, total) if total > 0 else step + 1
            job.touch()
        # Decoding a preview can take a while; do it outside the lock so /progress never waits for it.
        if preview is not None and self.wants_preview(step):
            image = preview()
            with self._lock:
                self._job.preview = image
                self._job.preview_id += 1
                self._job.touch()

    def wants_preview(self, step: int) -> bool:
        return wants_preview(self._preview_every(), step, self._job.sampling_steps)

    @staticmethod
    def _raise_if_stopped(job: Job, *, skippable: bool) -> None:
        if job.interrupted or job.cancel_requested:
            raise Interrupted()
        if skippable and job.skipped:
            raise Skipped()
