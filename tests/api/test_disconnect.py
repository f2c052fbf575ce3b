"""--cancel-on-disconnect: a synchronous txt2img whose client hangs up cancels its job."""

import asyncio
import json

from sdserver.app import create_app
from sdserver.jobs import JobState
from sdserver.settings import Settings


def http_scope(path: str) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 5000), "server": ("test", 80),
    }


def run_until_hangup(tmp_path, engine, *, cancel_on_disconnect: bool) -> JobState:
    app = create_app(Settings(data_dir=tmp_path, cancel_on_disconnect=cancel_on_disconnect), engine=engine)
    # 50 steps of 40 ms: the job would run 2 s; a hang-up is noticed within the 0.5 s disconnect poll.
    body = json.dumps({"steps": 50, "force_task_id": "task(hangup)"}).encode()

    async def scenario() -> JobState:
        loop = asyncio.get_running_loop()
        async with app.router.lifespan_context(app):
            hung_up = asyncio.Event()
            body_sent = False

            async def receive():
                nonlocal body_sent
                if not body_sent:
                    body_sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await hung_up.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                pass

            request = asyncio.ensure_future(app(http_scope("/sdapi/v1/txt2img"), receive, send))
            assert await asyncio.to_thread(engine.in_step.wait, 5)
            hung_up.set()
            engine.release.set()
            started = loop.time()
            await asyncio.wait_for(request, 10)
            elapsed = loop.time() - started
            assert elapsed < 1.5 if cancel_on_disconnect else elapsed > 1.5
            return app.state.queue.get("task(hangup)").state

    return asyncio.run(scenario())


def test_hanging_up_cancels_the_job(tmp_path, fake_engine):
    engine = fake_engine(step_delay=0.04).hold()
    assert run_until_hangup(tmp_path, engine, cancel_on_disconnect=True) is JobState.CANCELLED


def test_without_the_flag_the_job_runs_on(tmp_path, fake_engine):
    engine = fake_engine(step_delay=0.04).hold()
    assert run_until_hangup(tmp_path, engine, cancel_on_disconnect=False) is JobState.SUCCEEDED
