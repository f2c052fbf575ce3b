"""The /sdserver/v1 job API: submit, poll, cancel, Server-Sent Events, health."""

import json
import time


def poll(client, url, until=("succeeded", "failed", "cancelled"), timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if body["status"] in until:
            return body
        time.sleep(0.01)
    raise AssertionError(f"{url} never reached {until}")


def sse_events(text):
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_submit_poll_and_get_an_a1111_result(client):
    r = client.post("/sdserver/v1/jobs/txt2img", json={"seed": 9, "steps": 3, "batch_size": 2})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running") and job["poll_url"] == f"/sdserver/v1/jobs/{job['id']}"
    done = poll(client, job["poll_url"])
    assert done["status"] == "succeeded" and done["error"] is None
    assert json.loads(done["result"]["info"])["all_seeds"] == [9, 10]
    assert len(done["result"]["images"]) == 2 and done["progress"] == 1.0


def test_img2img_job(client):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    r = client.post("/sdserver/v1/jobs/img2img",
                    json={"init_images": [base64.b64encode(buffer.getvalue()).decode()], "steps": 2})
    assert r.status_code == 202
    assert poll(client, r.json()["poll_url"])["status"] == "succeeded"


def test_a_failed_job_reports_its_error(client, engine_of):
    engine_of(client).fail_with = lambda: RuntimeError("boom")
    job = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2}).json()
    done = poll(client, job["poll_url"])
    assert done["status"] == "failed" and done["result"] is None
    assert done["error"]["error"] == "RuntimeError" and "boom" not in json.dumps(done)


def test_running_job_shows_progress_and_preview(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    client.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 1})
    job = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 100}).json()
    assert engine.in_step.wait(5)
    engine.release.set()
    body = poll(client, job["poll_url"], until=("running",))
    deadline = time.monotonic() + 5
    while body["preview"] is None and time.monotonic() < deadline and body["status"] == "running":
        body = client.get(job["poll_url"]).json()
    assert body["preview"] is not None and body["steps"] == 100


def test_cancel_a_queued_job(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    running = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2, "seed": 1}).json()
    assert engine.in_step.wait(5)
    queued = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2, "seed": 2}).json()
    assert client.get(queued["poll_url"]).json()["queue_position"] == 0
    r = client.delete(queued["poll_url"])
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    engine.release.set()
    assert poll(client, running["poll_url"])["status"] == "succeeded"
    assert engine.generated == [1]


def test_cancel_a_running_job(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    job = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 50}).json()
    assert engine.in_step.wait(5)
    assert client.delete(job["poll_url"]).json()["cancel_requested"] is True
    engine.release.set()
    done = poll(client, job["poll_url"])
    assert done["status"] == "cancelled" and done["result"] is None


def test_unknown_job_is_404(client):
    assert client.get("/sdserver/v1/jobs/nope").status_code == 404
    assert client.delete("/sdserver/v1/jobs/nope").status_code == 404
    assert client.get("/sdserver/v1/jobs/nope/events").status_code == 404


def test_results_expire_after_the_job_ttl(make_client):
    client = make_client(job_ttl=0.05)
    job = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 1}).json()
    client.app.state.queue.wait_sync(job["id"], 5)
    time.sleep(0.1)
    assert client.get(job["poll_url"]).status_code == 404


def test_events_stream_progress_then_done(make_client, fake_engine):
    engine = fake_engine(step_delay=0.02)
    client = make_client(engine)
    job = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 20, "seed": 3}).json()
    with client.stream("GET", f"/sdserver/v1/jobs/{job['id']}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = sse_events(text)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"} and len(names) >= 2
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps)
    assert json.loads(events[-1][1]["result"]["info"])["seed"] == 3


def test_events_of_a_cancelled_job_end_with_cancelled(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    first = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2}).json()
    assert engine.in_step.wait(5)
    second = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2}).json()
    client.delete(second["poll_url"])
    with client.stream("GET", f"/sdserver/v1/jobs/{second['id']}/events") as r:
        events = sse_events("".join(r.iter_text()))
    assert [name for name, _ in events] == ["cancelled"]
    engine.release.set()
    poll(client, first["poll_url"])


def test_events_of_a_failed_job_end_with_failed(client, engine_of):
    engine_of(client).fail_with = lambda: RuntimeError("boom")
    job = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2}).json()
    with client.stream("GET", f"/sdserver/v1/jobs/{job['id']}/events") as r:
        events = sse_events("".join(r.iter_text()))
    assert events[-1][0] == "failed" and events[-1][1]["error"]["error"] == "RuntimeError"


def test_health(client):
    assert client.get("/sdserver/v1/health").json() == {"status": "ok"}


def test_a_synchronous_jobs_id_can_be_polled_after_it_answered(client):
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1, "force_task_id": "task(s)"}).status_code == 200
    body = client.get("/sdserver/v1/jobs/task(s)").json()
    assert body["status"] == "succeeded" and body["result"] is None


def test_an_active_force_task_id_cannot_be_reused(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    assert client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2, "force_task_id": "t1"}).status_code == 202
    r = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 2, "force_task_id": "t1"})
    assert r.status_code == 422 and r.json()["field"] == "force_task_id"
    engine.release.set()
    poll(client, "/sdserver/v1/jobs/t1")
    assert client.post("/sdserver/v1/jobs/txt2img", json={"steps": 1, "force_task_id": "t1"}).status_code == 202
