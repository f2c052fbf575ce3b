import threading

import pytest

from sdserver.engine.types import Interrupted, Skipped
from sdserver.jobs.control import WorkerControl, wants_preview
from sdserver.jobs.job import Job, JobKind


def make_control(every: int = 0) -> tuple[Job, WorkerControl]:
    job = Job(id="j", kind=JobKind.GENERATE, name="t", work=lambda e, c: None, created_at=0.0, timestamp="0")
    return job, WorkerControl(job, threading.Lock(), lambda: every)


@pytest.mark.parametrize(
    ("every", "steps", "expected"),
    [(1, 4, [0, 1, 2, 3]), (2, 5, [1, 3]), (10, 20, [9, 19]), (-1, 4, [3]), (0, 4, [])],
)
def test_wants_preview_follows_show_progress_every_n_steps(every, steps, expected):
    assert [s for s in range(steps) if wants_preview(every, s, steps)] == expected


def test_step_records_progress_and_decodes_previews_only_when_wanted():
    job, control = make_control(every=2)
    calls = []
    control.begin_pass(1, 3, 4)
    for step in range(4):
        control.step(step, lambda: calls.append(step) or "img")
    assert (job.job_no, job.pass_count, job.sampling_step, job.sampling_steps) == (1, 3, 4, 4)
    assert calls == [1, 3]
    assert job.preview_id == 2 and job.preview == "img"


def test_skip_raises_once_per_pass_and_interrupt_sticks():
    job, control = make_control()
    control.begin_pass(0, 2, 3)
    job.skipped = True
    with pytest.raises(Skipped):
        control.step(0, None)
    control.begin_pass(1, 2, 3)  # the next pass proceeds
    control.step(0, None)
    job.interrupted = True
    with pytest.raises(Interrupted):
        control.step(1, None)
    with pytest.raises(Interrupted):
        control.begin_pass(2, 3, 3)
