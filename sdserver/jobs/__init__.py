"""jobs: the queue, its worker threads, job states and progress. No torch, no HTTP."""

from sdserver.jobs.errors import DuplicateJobId, JobCancelled, UnknownJob
from sdserver.jobs.job import JobInfo, JobKind, JobState
from sdserver.jobs.progress import ProgressSnapshot
from sdserver.jobs.queue import JobQueue, result_of

__all__ = [
    "DuplicateJobId",
    "JobCancelled",
    "JobInfo",
    "JobKind",
    "JobQueue",
    "JobState",
    "ProgressSnapshot",
    "UnknownJob",
    "result_of",
]
