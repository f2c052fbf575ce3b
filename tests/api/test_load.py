"""50 concurrent clients on loopback against a real uvicorn: each gets the images of its own seeds."""

import base64
import concurrent.futures
import io
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from PIL import Image

from sdserver.app import create_app
from sdserver.settings import Settings

CLIENTS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_server(tmp_path, fake_engine):
    engine = fake_engine(step_delay=0.0005)
    app = create_app(Settings(data_dir=tmp_path, queue_size=CLIENTS), engine=engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(10)


def test_fifty_concurrent_clients_each_get_their_own_seeds(live_server):
    url, engine = live_server

    def client(seed: int) -> tuple[int, list[int], list[tuple[int, int, int]]]:
        body = {"prompt": f"client {seed}", "seed": seed, "batch_size": 2, "steps": 2, "width": 16, "height": 16}
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=30)
        info = json.loads(r.json()["info"])
        pixels = [Image.open(io.BytesIO(base64.b64decode(b))).getpixel((0, 0)) for b in r.json()["images"]]
        return r.status_code, info["all_seeds"], pixels

    started = time.monotonic()
    seeds = [1000 + 10 * i for i in range(CLIENTS)]
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(client, seeds))
    assert time.monotonic() - started < 30
    for seed, (status, all_seeds, pixels) in zip(seeds, results):
        assert status == 200
        assert all_seeds == [seed, seed + 1]
        assert pixels == [((s * 37) % 256, (s * 91) % 256, (s * 53) % 256) for s in (seed, seed + 1)]
    assert sorted(engine.generated) == seeds  # every job ran exactly once
    assert httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] == 0
