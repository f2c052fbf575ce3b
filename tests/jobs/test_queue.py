import asyncio
import threading
import time

import pytest

from sdserver.errors import OutOfMemory, QueueFull
from sdserver.jobs import JobCancelled, JobKind, JobQueue, JobState, UnknownJob, result_of
from sdserver.jobs.errors import DuplicateJobId


def test_jobs_run_in_fifo_order(engine, queue_factory, stub_engine, request_of):
    q = queue_factory(engine)
    ids = [q.submit_generation(request_of(seed)).id for seed in (5, 3, 9, 1)]
    infos = [q.wait_sync(i, 5) for i in ids]
    assert [i.state for i in infos] == [JobState.SUCCEEDED] * 4
    assert engine.generated == [5, 3, 9, 1]
    assert [i.result.images[0].seed for i in infos] == [5, 3, 9, 1]


def test_full_queue_raises_queue_full_with_retry_after(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine, max_queued=2)
    running = q.submit_generation(request_of(1))
    assert held_engine.in_step.wait(5)
    q.submit_generation(request_of(2))
    q.submit_generation(request_of(3))
    with pytest.raises(QueueFull) as caught:
        q.submit_generation(request_of(4))
    assert caught.value.retry_after >= 1
    assert "--queue-size" in caught.value.message
    held_engine.release.set()
    assert q.wait_sync(running.id, 5).state is JobState.SUCCEEDED


def test_cancel_queued_job_removes_it(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine)
    first = q.submit_generation(request_of(1))
    assert held_engine.in_step.wait(5)
    second = q.submit_generation(request_of(2))
    third = q.submit_generation(request_of(3))
    assert q.get(third.id).queue_position == 1
    assert q.cancel(second.id).state is JobState.CANCELLED
    assert q.get(third.id).queue_position == 0
    held_engine.release.set()
    q.wait_sync(third.id, 5)
    assert held_engine.generated == [1, 3]
    with pytest.raises(JobCancelled):
        result_of(q.get(second.id))
    assert q.get(first.id).state is JobState.SUCCEEDED


def test_cancel_running_job_stops_it(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine)
    job = q.submit_generation(request_of(1, steps=50, n_iter=3))
    assert held_engine.in_step.wait(5)
    q.cancel(job.id)
    held_engine.release.set()
    info = q.wait_sync(job.id, 5)
    assert info.state is JobState.CANCELLED


def test_cancel_unknown_job_raises(stub_engine, request_of):
    q = JobQueue(stub_engine())
    with pytest.raises(UnknownJob):
        q.cancel("nope")


def test_interrupt_returns_the_finished_images(queue_factory, stub_engine, request_of):
    held = stub_engine(hold=True)
    q = queue_factory(held)
    job = q.submit_generation(request_of(10, steps=2, n_iter=3))
    assert held.in_step.wait(5)
    q.interrupt()
    assert q.snapshot().interrupted
    held.release.set()
    info = q.wait_sync(job.id, 5)
    assert info.state is JobState.SUCCEEDED
    assert info.result.interrupted
    assert [img.seed for img in info.result.images] == [10]  # the pass in progress; later passes never start


def test_interrupt_while_idle_has_no_lasting_effect(queue_factory, stub_engine, request_of):
    engine = stub_engine()
    q = queue_factory(engine)
    q.interrupt()
    info = q.wait_sync(q.submit_generation(request_of(10, steps=2, n_iter=3)).id, 5)
    assert not info.result.interrupted and len(info.result.images) == 3


def test_interrupt_that_escapes_the_engine_gives_an_empty_interrupted_result(queue_factory, stub_engine, request_of):
    held = stub_engine(hold=True, let_interrupt_escape=True)
    q = queue_factory(held)
    job = q.submit_generation(request_of(1))
    assert held.in_step.wait(5)
    q.interrupt()
    held.release.set()
    info = q.wait_sync(job.id, 5)
    assert info.state is JobState.SUCCEEDED
    assert info.result.images == () and info.result.interrupted and info.result.model_name == "stub"


def test_skip_ends_the_current_pass_and_the_next_proceeds(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine)
    job = q.submit_generation(request_of(20, steps=4, n_iter=2))
    assert held_engine.in_step.wait(5)
    q.skip()
    assert q.snapshot().skipped
    held_engine.release.set()
    info = q.wait_sync(job.id, 5)
    assert info.state is JobState.SUCCEEDED and not info.result.interrupted
    assert [img.seed for img in info.result.images] == [20, 21]
    assert info.sampling_step == 4  # the second pass ran all its steps


def test_results_expire_after_the_ttl(engine, queue_factory, stub_engine, request_of, fake_clock):
    clock = fake_clock
    q = queue_factory(engine, job_ttl=60, clock=clock)
    job = q.submit_generation(request_of(1))
    q.wait_sync(job.id, 5)
    clock.now += 59
    assert q.get(job.id).state is JobState.SUCCEEDED
    clock.now += 1
    assert q.get(job.id) is None
    with pytest.raises(UnknownJob):
        q.cancel(job.id)


def test_a_failing_job_keeps_its_error_and_the_worker_goes_on(queue_factory, stub_engine, request_of):
    engine = stub_engine(fail_at_step=1, error=lambda: ValueError("boom"))
    q = queue_factory(engine)
    bad = q.submit_generation(request_of(1))
    info = q.wait_sync(bad.id, 5)
    assert info.state is JobState.FAILED and isinstance(info.error, ValueError)
    with pytest.raises(ValueError, match="boom"):
        result_of(info)
    engine.fail_at_step = None
    good = q.wait_sync(q.submit_generation(request_of(2)).id, 5)
    assert good.state is JobState.SUCCEEDED


def test_out_of_memory_frees_caches_and_suggests_a_smaller_size(queue_factory, stub_engine, request_of):
    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError, matched by name
        pass

    engine = stub_engine(fail_at_step=0, error=lambda: OutOfMemoryError("CUDA out of memory"))
    q = queue_factory(engine)
    info = q.wait_sync(q.submit_generation(request_of(1)).id, 5)
    assert info.state is JobState.FAILED
    assert isinstance(info.error, OutOfMemory)
    assert "smaller" in info.error.message and "64x64" in info.error.message
    assert engine.freed == 1
    engine.fail_at_step = None
    assert q.wait_sync(q.submit_generation(request_of(2)).id, 5).state is JobState.SUCCEEDED


def test_plain_memory_error_counts_as_out_of_memory(queue_factory, stub_engine, request_of):
    engine = stub_engine(fail_at_step=0, error=MemoryError)
    q = queue_factory(engine)
    info = q.wait_sync(q.submit_generation(request_of(1)).id, 5)
    assert isinstance(info.error, OutOfMemory) and engine.freed == 1


def test_snapshot_counts_running_passes_and_queued_jobs(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine)
    assert q.snapshot().job_count == 0 and not q.snapshot().active
    running = q.submit_generation(request_of(1, steps=5, n_iter=2), name="scripts_txt2img")
    q.submit_generation(request_of(2))
    q.submit(lambda engine, control: None, kind=JobKind.REFRESH)
    assert held_engine.in_step.wait(5)
    snap = q.snapshot()
    assert snap.job_id == running.id and snap.job == "scripts_txt2img"
    assert snap.job_count == 2 + 2 and snap.queued == 2
    assert snap.sampling_steps == 5 and snap.job_no == 0
    assert 0.0 < snap.fraction() < 1.0


def test_previews_follow_the_policy(queue_factory, stub_engine, request_of):
    engine = stub_engine()
    q = queue_factory(engine, preview_every=lambda: 2)
    info = q.wait_sync(q.submit_generation(request_of(1, steps=6)).id, 5)
    assert engine.previews == 3 and info.preview_id == 3


def test_no_preview_before_the_first_step_then_one_per_step(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine, preview_every=lambda: 1)
    job = q.submit_generation(request_of(1, steps=2))
    assert held_engine.in_step.wait(5)
    assert q.snapshot().current_image is None
    held_engine.release.set()
    q.wait_sync(job.id, 5)
    assert held_engine.previews == 2 and q.get(job.id).preview_id == 2


def test_no_previews_by_default(engine, queue_factory, stub_engine, request_of):
    q = queue_factory(engine)
    q.wait_sync(q.submit_generation(request_of(1, steps=6)).id, 5)
    assert engine.previews == 0


def test_duplicate_active_id_is_refused_but_a_finished_one_is_reused(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine)
    q.submit_generation(request_of(1), job_id="task(a)")
    with pytest.raises(DuplicateJobId):
        q.submit_generation(request_of(2), job_id="task(a)")
    held_engine.release.set()
    q.wait_sync("task(a)", 5)
    again = q.submit_generation(request_of(3), job_id="task(a)")
    assert q.wait_sync(again.id, 5).result.images[0].seed == 3


def test_async_wait_does_not_block_the_event_loop(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine)
    job = q.submit_generation(request_of(1, steps=3))

    async def scenario():
        ticks = 0
        waiter = asyncio.ensure_future(q.wait(job.id))
        while ticks < 5:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not waiter.done()
        held_engine.release.set()
        return ticks, await asyncio.wait_for(waiter, 5)

    ticks, info = asyncio.run(scenario())
    assert ticks == 5 and info.state is JobState.SUCCEEDED


def test_watch_yields_changes_and_ends_with_the_final_state(held_engine, queue_factory, stub_engine, request_of):
    q = queue_factory(held_engine)
    job = q.submit_generation(request_of(1, steps=3))

    async def scenario():
        seen = []
        async for info in q.watch(job.id, interval=0.02):
            seen.append(info)
            if len(seen) == 1:
                held_engine.release.set()
        return seen

    seen = asyncio.run(scenario())
    versions = [i.version for i in seen]
    assert versions == sorted(set(versions))
    assert seen[-1].state is JobState.SUCCEEDED
    assert all(not i.state.finished for i in seen[:-1])


def test_shutdown_cancels_queued_jobs_and_lets_the_running_one_finish(queue_factory, stub_engine, request_of):
    engine = stub_engine(hold=True)
    q = JobQueue(engine)
    q.start()
    running = q.submit_generation(request_of(1))
    queued = q.submit_generation(request_of(2))
    assert engine.in_step.wait(5)
    threading.Timer(0.05, engine.release.set).start()
    q.shutdown(grace=5)
    assert q.get(queued.id).state is JobState.CANCELLED
    assert q.get(running.id).state is JobState.SUCCEEDED
    with pytest.raises(QueueFull, match="shutting down"):
        q.submit_generation(request_of(3))


def test_shutdown_interrupts_a_job_that_outlives_the_grace_period(stub_engine, request_of):
    engine = stub_engine(hold=True)
    q = JobQueue(engine)
    q.start()
    running = q.submit_generation(request_of(1, steps=1000))
    assert engine.in_step.wait(5)
    releaser = threading.Timer(0.2, engine.release.set)
    releaser.start()
    started = time.monotonic()
    q.shutdown(grace=0.05)
    assert time.monotonic() - started < 3
    assert q.get(running.id).state is JobState.CANCELLED


def test_drop_result_keeps_the_state_but_frees_the_images(engine, queue_factory, stub_engine, request_of):
    q = queue_factory(engine, preview_every=lambda: 1)
    info = q.wait_sync(q.submit_generation(request_of(1)).id, 5)
    assert info.result is not None and info.preview is None  # previews are dropped when a job ends
    q.drop_result(info.id)
    assert q.get(info.id).state is JobState.SUCCEEDED and q.get(info.id).result is None
