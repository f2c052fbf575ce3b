"""txt2img/img2img through the queue, progress while a job runs, interrupt/skip, faults."""

import base64
import io
import json
import threading
import time

from PIL import Image

from sdserver.settings import Limits


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def colour(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post_in_thread(client, path, body):
    box = {}

    def run():
        box["response"] = client.post(path, json=body)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_txt2img_returns_images_of_its_seeds_with_a1111_info(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 500, "batch_size": 2, "steps": 3,
                                               "width": 64, "height": 64, "sampler_index": "Euler a"})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [500, 501]
    assert [decode(img).getpixel((0, 0)) for img in body["images"]] == [colour(500), colour(501)]
    assert body["parameters"]["seed"] == 500
    assert info["sd_model_name"] == "alpha"
    assert decode(body["images"][0]).info["parameters"].startswith("a cat\n")


def test_random_seed_is_resolved_in_info_but_echoed_as_sent(client):
    body = client.post("/sdapi/v1/txt2img", json={"steps": 2, "seed": -1}).json()
    info = json.loads(body["info"])
    assert info["seed"] >= 0 and body["parameters"]["seed"] == -1


def test_img2img_accepts_a_data_url(client):
    init = "data:image/png;base64," + b64_png(Image.new("RGB", (64, 64), (1, 2, 3)))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [init], "steps": 2, "seed": 7})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [7]


def test_img2img_without_init_images_names_the_field(client):
    r = client.post("/sdapi/v1/img2img", json={"steps": 2})
    assert r.status_code == 422
    assert "init_images" in r.json()["detail"]


def test_requests_run_in_arrival_order(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    first, box1 = post_in_thread(client, "/sdapi/v1/txt2img", {"seed": 11, "steps": 2})
    assert engine.in_step.wait(5)
    threads = []
    for seed in (12, 13, 14):
        threads.append(post_in_thread(client, "/sdapi/v1/txt2img", {"seed": seed, "steps": 2}))
        assert wait_until(lambda s=seed: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == s - 10)
    engine.release.set()
    for thread, box in [(first, box1), *threads]:
        thread.join(5)
        assert box["response"].status_code == 200
    assert engine.generated == [11, 12, 13, 14]


def test_progress_answers_at_once_while_a_job_runs_and_counts_queued_work(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    t1, box1 = post_in_thread(client, "/sdapi/v1/txt2img", {"seed": 1, "steps": 20, "n_iter": 2})
    assert engine.in_step.wait(5)
    t2, box2 = post_in_thread(client, "/sdapi/v1/txt2img", {"seed": 2, "steps": 20})
    assert wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 3)
    started = time.monotonic()
    p = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
    assert time.monotonic() - started < 1.0
    assert p["state"]["job"] == "scripts_txt2img"
    assert p["state"]["sampling_steps"] == 20 and p["state"]["job_count"] == 3
    assert 0 < p["progress"] < 1 and p["current_image"] is None
    assert set(p) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    engine.release.set()
    t1.join(5)
    t2.join(5)
    assert box1["response"].status_code == box2["response"].status_code == 200
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_progress_carries_a_live_preview(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    assert client.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 1}).status_code == 200
    thread, box = post_in_thread(client, "/sdapi/v1/txt2img", {"seed": 1, "steps": 150})
    assert engine.in_step.wait(5)
    engine.release.set()
    assert wait_until(lambda: client.get("/sdapi/v1/progress").json()["current_image"] is not None)
    image = client.get("/sdapi/v1/progress").json()["current_image"]
    assert decode(image).getpixel((0, 0)) == (0, 255, 0)
    thread.join(5)


def test_interrupt_returns_the_finished_images(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    thread, box = post_in_thread(client, "/sdapi/v1/txt2img", {"seed": 30, "steps": 10, "n_iter": 3})
    assert engine.in_step.wait(5)
    assert client.post("/sdapi/v1/interrupt").json() == {}
    engine.release.set()
    thread.join(5)
    r = box["response"]
    assert r.status_code == 200
    assert json.loads(r.json()["info"])["all_seeds"][0] == 30
    assert len(r.json()["images"]) == 1  # the pass in progress only


def test_skip_moves_on_to_the_next_batch(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    thread, box = post_in_thread(client, "/sdapi/v1/txt2img", {"seed": 40, "steps": 10, "n_iter": 2})
    assert engine.in_step.wait(5)
    r = client.post("/sdapi/v1/skip")
    assert r.status_code == 200 and r.json() is None
    engine.release.set()
    thread.join(5)
    assert [decode(i).getpixel((0, 0)) for i in box["response"].json()["images"]] == [colour(40), colour(41)]


def test_a_failing_job_answers_a1111_error_body_and_the_next_succeeds(client, engine_of):
    engine = engine_of(client)
    engine.fail_with = lambda: ValueError("secret internals")
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2})
    assert r.status_code == 500
    body = r.json()
    assert set(body) >= {"error", "detail", "body", "errors"}
    assert body["error"] == "ValueError"
    assert "secret internals" not in r.text and "Traceback" not in r.text
    engine.fail_with = None
    assert client.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200


def test_out_of_memory_fails_the_job_frees_caches_and_the_next_succeeds(client, engine_of):
    class OutOfMemoryError(RuntimeError):
        pass

    engine = engine_of(client)
    engine.fail_with = lambda: OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64})
    assert r.status_code == 507
    assert r.json()["error"] == "OutOfMemory" and "smaller" in r.json()["detail"]
    assert engine.freed == 1
    engine.fail_with = None
    assert client.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200


def test_no_model_answers_503_saying_where_to_put_one(make_client, fake_engine):
    client = make_client(fake_engine(checkpoints_present=False))
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2})
    assert r.status_code == 503
    assert "Stable-diffusion" in r.json()["detail"]
    assert client.get("/sdapi/v1/sd-models").json() == []


def test_full_queue_answers_503_with_retry_after(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine, queue_size=1)
    t1, _ = post_in_thread(client, "/sdapi/v1/txt2img", {"steps": 2})
    assert engine.in_step.wait(5)
    t2, _ = post_in_thread(client, "/sdapi/v1/txt2img", {"steps": 2})
    assert wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2)
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2})
    assert r.status_code == 503
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"] == "QueueFull" and "queue" in r.json()["detail"]
    engine.release.set()
    t1.join(5)
    t2.join(5)


def test_limits_are_422s_naming_the_field(make_client):
    client = make_client(limits=Limits(max_steps=10))
    r = client.post("/sdapi/v1/txt2img", json={"steps": 11})
    assert r.status_code == 422 and r.json()["field"] == "steps"


def test_validation_errors_keep_fastapi_shape_and_name_the_field(client):
    r = client.post("/sdapi/v1/txt2img", json={"steps": "many"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", "steps"] and "msg" in detail[0] and "type" in detail[0]
    assert "input" not in detail[0]


def test_unknown_fields_are_ignored(client):
    assert client.post("/sdapi/v1/txt2img", json={"steps": 2, "url": "x", "auth": {"a": 1}}).status_code == 200


def test_force_task_id_feeds_internal_progress(make_client, fake_engine):
    engine = fake_engine().hold()
    client = make_client(engine)
    thread, box = post_in_thread(client, "/sdapi/v1/txt2img", {"steps": 5, "force_task_id": "task(mine)"})
    assert engine.in_step.wait(5)
    t2, _ = post_in_thread(client, "/sdapi/v1/txt2img", {"steps": 1, "force_task_id": "task(next)"})
    assert wait_until(lambda: client.get("/internal/pending-tasks").json()["tasks"] == ["task(next)"])
    assert client.get("/internal/pending-tasks").json() == {"size": 1, "tasks": ["task(next)"]}
    p = client.post("/internal/progress", json={"id_task": "task(mine)", "id_live_preview": -1}).json()
    assert p["active"] is True and p["queued"] is False
    q = client.post("/internal/progress", json={"id_task": "task(next)"}).json()
    assert q["active"] is False and q["queued"] is True
    engine.release.set()
    thread.join(5)
    t2.join(5)
    done = client.post("/internal/progress", json={"id_task": "task(mine)"}).json()
    assert done["completed"] is True
    assert client.get("/internal/ping").json() == {}


def test_a_synchronous_job_does_not_keep_its_images_after_answering(client):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "force_task_id": "task(sync)"})
    assert r.status_code == 200
    info = client.app.state.queue.get("task(sync)")
    assert info.state.value == "succeeded" and info.result is None


def test_progress_answers_while_the_thread_pool_is_exhausted(make_client, fake_engine):
    import anyio

    engine = fake_engine()
    gate = threading.Event()
    listing = engine.checkpoints
    engine.checkpoints = lambda: (gate.wait(5), listing())[1]
    client = make_client(engine)

    def one_thread_only():
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1

    client.portal.call(one_thread_only)
    box = {}
    blocked = threading.Thread(target=lambda: box.update(r=client.get("/sdapi/v1/sd-models")))
    blocked.start()
    time.sleep(0.1)  # the listing now holds the only worker thread
    started = time.monotonic()
    assert client.get("/sdapi/v1/progress").status_code == 200
    assert time.monotonic() - started < 1.0
    gate.set()
    blocked.join(5)
    assert box["r"].status_code == 200


def test_image_urls_are_refused_without_the_flag(client):
    r = client.post("/sdapi/v1/img2img", json={"init_images": ["http://169.254.169.254/latest/x.png"], "steps": 1})
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]"
    r = client.post("/sdapi/v1/png-info", json={"image": "https://example.com/a.png"})
    assert r.status_code == 422 and r.json()["field"] == "image"


def test_decompression_bombs_are_refused(make_client):
    client = make_client(limits=Limits(max_image_pixels=32 * 32))
    init = b64_png(Image.new("RGB", (64, 64)))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [init], "steps": 1})
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]"


def test_save_images_writes_a1111_folders_and_names(make_client, tmp_path):
    from PIL import Image

    client = make_client()
    body = {"prompt": "a cat", "seed": 7, "batch_size": 2, "save_images": True, "steps": 2, "width": 64, "height": 64}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200
    day_dirs = list((tmp_path / "outputs" / "txt2img-images").iterdir())
    assert len(day_dirs) == 1
    names = sorted(p.name for p in day_dirs[0].iterdir())
    assert names == ["00000-7.png", "00001-8.png"]
    assert Image.open(day_dirs[0] / "00000-7.png").info["parameters"].startswith("a cat\n")
    assert [p.name for p in (tmp_path / "outputs" / "txt2img-grids").iterdir()] == ["grid-00000.png"]
    client.post("/sdapi/v1/txt2img", json={**body, "batch_size": 1})
    assert (day_dirs[0] / "00002-7.png").is_file()
