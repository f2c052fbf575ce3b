"""The job queue: FIFO, bounded, one worker thread per engine (device); the only caller of the engine.

Everything touching the model goes through here (generations, checkpoint switches, refreshes, unload/reload),
so no request ever runs on a half-loaded model. HTTP handlers read `snapshot()`/`get()`, which only copy
fields under a lock and never wait for the worker.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import math
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

from sdserver.engine.types import (
    Engine,
    GenerationRequest,
    GenerationResult,
    Interrupted,
    Skipped,
)
from sdserver.errors import QueueFull, SdServerError
from sdserver.jobs.control import PreviewEvery, WorkerControl
from sdserver.jobs.errors import DuplicateJobId, JobCancelled, UnknownJob
from sdserver.jobs.faults import is_out_of_memory, out_of_memory_error
from sdserver.jobs.job import Job, JobInfo, JobKind, JobState, Work
from sdserver.jobs.progress import ProgressSnapshot

log = logging.getLogger(__name__)

_DEFAULT_RETRY_AFTER_S = 5
_MAX_RETRY_AFTER_S = 60
# Weight of the newest job in the running average of job durations that Retry-After is estimated from.
_DURATION_EMA_WEIGHT = 0.3


def _never_preview() -> int:
    return 0


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")


class _Worker:
    """One device: its engine, its thread, and the job it is running."""

    def __init__(self, engine: Engine, index: int) -> None:
        self.engine = engine
        self.index = index
        self.thread: threading.Thread | None = None
        self.job: Job | None = None


class JobQueue:
    """A bounded FIFO of jobs run by one worker thread per engine.

    `engine` may be a sequence of engines (one per device); each gets a worker pulling from the same FIFO.
    Jobs that change the model (LOAD_CHECKPOINT, UNLOAD, ...) then run on whichever worker takes them, so
    several devices currently suit identical engines only.
    """

    def __init__(
        self,
        engine: Engine | Sequence[Engine],
        *,
        max_queued: int = 64,
        job_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        preview_every: PreviewEvery = _never_preview,
    ) -> None:
        engines = list(engine) if isinstance(engine, (list, tuple)) else [engine]
        if not engines:
            raise ValueError("JobQueue needs at least one engine")
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self._workers = [_Worker(e, i) for i, e in enumerate(engines)]
        self._max_queued = max_queued
        self._job_ttl = job_ttl
        self._clock = clock
        self._preview_every = preview_every
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[Job] = collections.deque()  # in finishing order, for TTL expiry
        self._closed = False
        self._started = False
        self._mean_duration: float | None = None

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the worker threads (once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for worker in self._workers:
            worker.thread = threading.Thread(
                target=self._work, args=(worker,), name=f"sdserver-worker-{worker.index}", daemon=True
            )
            worker.thread.start()

    def stop_accepting(self) -> None:
        """Refuse new jobs and cancel every queued one; the running jobs go on."""
        with self._lock:
            self._closed = True
            cancelled = list(self._pending)
            self._pending.clear()
            done = [self._mark_finished(job, JobState.CANCELLED) for job in cancelled]
            self._wakeup.notify_all()
        for callbacks, info in done:
            self._fire(callbacks, info)

    def shutdown(self, grace: float = 10.0, *, stop_timeout: float = 10.0) -> None:
        """Stop accepting, cancel queued jobs, give running ones `grace` seconds, then interrupt them and
        wait up to `stop_timeout` seconds for them to stop (the threads are daemons: a stuck one can't hold
        the process)."""
        self.stop_accepting()
        deadline = time.monotonic() + grace
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(max(deadline - time.monotonic(), 0.0))
        with self._lock:
            for worker in self._workers:
                if worker.job is not None:
                    log.warning("Shutdown: interrupting job %s after %.1f s grace", worker.job.id, grace)
                    worker.job.cancel_requested = True
                    worker.job.touch()
        deadline = time.monotonic() + stop_timeout
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(max(deadline - time.monotonic(), 0.0))

    def __enter__(self) -> JobQueue:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def accepting(self) -> bool:
        return not self._closed

    # ----------------------------------------------------------------------------------------- submitting

    def submit(
        self,
        work: Work,
        *,
        kind: JobKind = JobKind.CALL,
        name: str = "",
        job_id: str | None = None,
        request: GenerationRequest | None = None,
        passes: int = 1,
        context: Any = None,
    ) -> JobInfo:
        """Queue `work(engine, control)`. Raises QueueFull when the queue is full or shutting down."""
        with self._lock:
            self._purge()
            if self._closed:
                raise QueueFull("The server is shutting down and accepts no new jobs.")
            if len(self._pending) >= self._max_queued:
                error = QueueFull(
                    f"The job queue is full ({self._max_queued} jobs waiting); retry in a moment "
                    "(the limit is --queue-size)."
                )
                error.retry_after = self._retry_after()  # type: ignore[attr-defined]
                raise error
            job_id = job_id or uuid.uuid4().hex
            existing = self._jobs.get(job_id)
            if existing is not None and not existing.state.finished:
                raise DuplicateJobId(f"Job id {job_id!r} is already queued or running.", field="id")
            job = Job(
                id=job_id,
                kind=kind,
                name=name or kind.value,
                work=work,
                created_at=self._clock(),
                timestamp=_timestamp(),
                pass_count=max(passes, 1),
                request=request,
                context=context,
            )
            self._jobs[job_id] = job
            self._pending.append(job)
            self._wakeup.notify()
            return job.view(len(self._pending) - 1)

    def submit_generation(
        self,
        request: GenerationRequest,
        *,
        name: str = "generate",
        job_id: str | None = None,
        context: Any = None,
    ) -> JobInfo:
        """Queue a txt2img/img2img generation; its result is the engine's GenerationResult."""

        def generate(engine: Engine, control: Any) -> GenerationResult:
            return engine.generate(request, control)

        return self.submit(
            generate,
            kind=JobKind.GENERATE,
            name=name,
            job_id=job_id,
            request=request,
            passes=request.n_iter,
            context=context,
        )

    # ----------------------------------------------------------------------------------------- acting on jobs

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a job: a queued one is removed; a running generation stops at its next step."""
        fire = None
        with self._lock:
            job = self._require(job_id)
            if job.state is JobState.QUEUED:
                self._pending.remove(job)
                fire = self._mark_finished(job, JobState.CANCELLED)
            elif job.state is JobState.RUNNING and job.kind is JobKind.GENERATE:
                job.cancel_requested = True
                job.touch()
            info = job.view(self._position(job))
        if fire is not None:
            self._fire(*fire)
        return info

    def drop_result(self, job_id: str) -> None:
        """Forget a finished job's result (its state stays): for callers that already delivered it, so
        images are not held for the whole job TTL."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state.finished:
                job.result = None
                job.touch()

    def interrupt(self) -> None:
        """A1111's interrupt: running generations stop now and return what they finished."""
        self._flag_running("interrupted")

    def skip(self) -> None:
        """A1111's skip: the running generation's current pass ends; its next pass proceeds."""
        self._flag_running("skipped")

    def _flag_running(self, flag: str) -> None:
        with self._lock:
            for worker in self._workers:
                if worker.job is not None and worker.job.kind is JobKind.GENERATE:
                    setattr(worker.job, flag, True)
                    worker.job.touch()

    # ----------------------------------------------------------------------------------------- reading

    def get(self, job_id: str) -> JobInfo | None:
        with self._lock:
            self._purge()
            job = self._jobs.get(job_id)
            return None if job is None else job.view(self._position(job))

    def pending_ids(self) -> list[str]:
        with self._lock:
            return [job.id for job in self._pending]

    def completed_ids(self, limit: int = 16) -> list[str]:
        """The ids of the last `limit` finished jobs, oldest first (A1111 remembers 16)."""
        with self._lock:
            self._purge()
            recent = list(self._finished)[-limit:] if limit > 0 else []
            return [job.id for job in recent if self._jobs.get(job.id) is job]

    def snapshot(self) -> ProgressSnapshot:
        """A1111's global progress: the (first) running job, with job_count counting queued jobs too."""
        with self._lock:
            self._purge()
            queued = len(self._pending)
            running = [w.job for w in self._workers if w.job is not None]
            if not running:
                return ProgressSnapshot(job_count=queued, queued=queued)
            job = running[0]
            return ProgressSnapshot(
                job=job.name,
                job_id=job.id,
                job_count=sum(j.pass_count for j in running) + queued,
                job_no=job.job_no,
                sampling_step=job.sampling_step,
                sampling_steps=job.sampling_steps,
                job_timestamp=job.timestamp,
                started_at=job.started_at,
                queued=queued,
                interrupted=job.interrupted or job.cancel_requested,
                skipped=job.skipped,
                current_image=job.preview,
            )

    # ----------------------------------------------------------------------------------------- waiting

    def wait_sync(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """Block the calling thread until the job finishes (for threads and tests, never the event loop)."""
        event = threading.Event()
        box: list[JobInfo] = []

        def done(info: JobInfo) -> None:
            box.append(info)
            event.set()

        finished = self._on_done(job_id, done)
        if finished is not None:
            return finished
        if not event.wait(timeout):
            raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
        return box[0]

    async def wait(self, job_id: str) -> JobInfo:
        """Wait for the job to finish without blocking the event loop; returns its final view."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JobInfo] = loop.create_future()

        def resolve(info: JobInfo) -> None:
            if not future.done():
                future.set_result(info)

        def done(info: JobInfo) -> None:
            try:
                loop.call_soon_threadsafe(resolve, info)
            except RuntimeError:  # the loop closed while the job ran: nobody is waiting any more
                pass

        finished = self._on_done(job_id, done)
        if finished is not None:
            return finished
        try:
            return await future
        finally:
            with self._lock:
                job = self._jobs.get(job_id)
                if job is not None and done in job.on_done:
                    job.on_done.remove(done)

    async def result(self, job_id: str) -> Any:
        """Wait for the job and return its result; raise its error, or JobCancelled."""
        info = await self.wait(job_id)
        return result_of(info)

    async def watch(self, job_id: str, *, interval: float = 0.25) -> AsyncIterator[JobInfo]:
        """Yield the job's view each time it changed (polled every `interval` s), ending with its final view."""
        last_version = -1
        while True:
            info = self.get(job_id)
            if info is None:
                return
            if info.version != last_version:
                last_version = info.version
                yield info
            if info.state.finished:
                return
            try:
                await asyncio.wait_for(self.wait(job_id), timeout=interval)
            except TimeoutError:
                pass
            except UnknownJob:  # expired between two looks
                return

    # ----------------------------------------------------------------------------------------- internals

    def _require(self, job_id: str) -> Job:
        self._purge()
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"No job with id {job_id!r} (unknown, or its result expired).", field="id")
        return job

    def _position(self, job: Job) -> int | None:
        if job.state is not JobState.QUEUED:
            return None
        for index, queued in enumerate(self._pending):
            if queued is job:
                return index
        return None

    def _on_done(self, job_id: str, callback: Callable[[JobInfo], None]) -> JobInfo | None:
        """Register `callback` for the job's end; return its view instead when it already ended."""
        with self._lock:
            job = self._require(job_id)
            if job.state.finished:
                return job.view()
            job.on_done.append(callback)
            return None

    def _purge(self) -> None:
        now = self._clock()
        while self._finished:
            job = self._finished[0]
            assert job.finished_at is not None
            if now - job.finished_at < self._job_ttl:
                break
            self._finished.popleft()
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

    def _mark_finished(
        self, job: Job, state: JobState, *, result: Any = None, error: BaseException | None = None
    ) -> tuple[list[Callable[[JobInfo], None]], JobInfo]:
        job.state = state
        job.result = result
        job.error = error
        job.preview = None  # previews matter only while a job runs
        job.finished_at = self._clock()
        job.touch()
        self._finished.append(job)
        callbacks, job.on_done = job.on_done, []
        return callbacks, job.view()

    @staticmethod
    def _fire(callbacks: list[Callable[[JobInfo], None]], info: JobInfo) -> None:
        for callback in callbacks:
            try:
                callback(info)
            except Exception:  # a broken waiter must not take the worker down
                log.exception("job %s: a completion callback failed", info.id)

    def _retry_after(self) -> int:
        if self._mean_duration is None:
            return _DEFAULT_RETRY_AFTER_S
        return min(max(math.ceil(self._mean_duration), 1), _MAX_RETRY_AFTER_S)

    def _work(self, worker: _Worker) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wakeup.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
                job.state = JobState.RUNNING
                job.started_at = self._clock()
                job.touch()
                worker.job = job
            self._run(worker, job)

    def _run(self, worker: _Worker, job: Job) -> None:
        control = WorkerControl(job, self._lock, self._preview_every)
        result: Any = None
        error: BaseException | None = None
        try:
            result = job.work(worker.engine, control)
        except (Interrupted, Skipped):
            # The engine let the stop escape instead of returning its partial result: nothing was finished.
            result = self._empty_result(worker.engine) if job.kind is JobKind.GENERATE else None
        except Exception as exc:
            if is_out_of_memory(exc):
                log.error("job %s ran out of memory: %s", job.id, exc)
                self._free_memory(worker.engine)
                error = out_of_memory_error(job.request)
                error.__cause__ = exc
            elif isinstance(exc, SdServerError):  # expected (bad input, no model): no traceback needed
                log.warning("job %s (%s) failed: %s: %s", job.id, job.name, type(exc).__name__, exc.message)
                error = exc
            else:
                log.exception("job %s (%s) failed", job.id, job.name)
                error = exc
        with self._lock:
            worker.job = None
            if job.started_at is not None:
                duration = self._clock() - job.started_at
                previous = self._mean_duration
                self._mean_duration = (
                    duration if previous is None else previous + _DURATION_EMA_WEIGHT * (duration - previous)
                )
            if job.cancel_requested:
                fire = self._mark_finished(job, JobState.CANCELLED, result=result)
            elif error is not None:
                fire = self._mark_finished(job, JobState.FAILED, error=error)
            else:
                fire = self._mark_finished(job, JobState.SUCCEEDED, result=result)
        self._fire(*fire)

    @staticmethod
    def _free_memory(engine: Engine) -> None:
        free = getattr(engine, "free_caches", None)
        if callable(free):
            try:
                free()
            except Exception:
                log.exception("freeing memory after an out-of-memory error failed")

    @staticmethod
    def _empty_result(engine: Engine) -> GenerationResult:
        try:
            checkpoint = engine.current_checkpoint()
        except Exception:
            checkpoint = None
        return GenerationResult(
            images=(),
            model_name=checkpoint.model_name if checkpoint else "",
            model_hash=checkpoint.hash if checkpoint else None,
            interrupted=True,
        )


def result_of(info: JobInfo) -> Any:
    """A finished job's result; raises its error, or JobCancelled."""
    if info.state is JobState.FAILED:
        assert info.error is not None
        raise info.error
    if info.state is JobState.CANCELLED:
        raise JobCancelled(f"Job {info.id} was cancelled.")
    if not info.state.finished:
        raise RuntimeError(f"job {info.id} has not finished")
    return info.result
