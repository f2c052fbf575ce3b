"""Graceful stop of the real uvicorn server (what SIGTERM and server-stop trigger)."""

import socket
import threading
import time

import httpx

from sdserver.cli import build_server
from sdserver.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_stop_cancels_queued_requests_and_lets_the_running_one_finish(tmp_path, fake_engine):
    engine = fake_engine().hold()
    port = free_port()
    server = build_server(Settings(data_dir=tmp_path, port=port, shutdown_grace=5, api_server_stop=True),
                          engine=engine)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    results = {}

    def post(name, seed):
        results[name] = httpx.post(f"{url}/txt2img", json={"steps": 2, "seed": seed}, timeout=20)

    running = threading.Thread(target=post, args=("running", 1))
    running.start()
    assert engine.in_step.wait(5)
    queued = threading.Thread(target=post, args=("queued", 2))
    queued.start()
    while httpx.get(f"{url}/progress").json()["state"]["job_count"] < 2:
        time.sleep(0.01)

    assert httpx.post(f"{url}/server-stop").text == "Stopping."
    queued.join(5)
    assert results["queued"].status_code == 409  # cancelled by the shutdown, answered at once
    engine.release.set()
    running.join(5)
    thread.join(10)
    assert results["running"].status_code == 200
    assert engine.generated == [1]
    assert not thread.is_alive()
