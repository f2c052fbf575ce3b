"""A real server process: the classic client script, progress while generating, shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_the_classic_txt2img_script_runs_unchanged(server: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "txt2img.py"), server], cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "seed:" in run.stdout
    image = Image.open(tmp_path / "output_0.png")
    assert image.size == (128, 128)
    assert "Steps: 20, Sampler: Euler a, CFG scale: 7.0" in run.stdout


def test_progress_answers_within_a_second_while_a_20_step_job_runs(server: str) -> None:
    body = {"prompt": "a red circle", "steps": 20, "width": 256, "height": 256, "sampler_name": "Euler a"}
    result: dict = {}

    def generate() -> None:
        result["response"] = httpx.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=300)

    worker = threading.Thread(target=generate)
    worker.start()
    latencies, seen_running = [], False
    while worker.is_alive():
        started = time.monotonic()
        progress = httpx.get(f"{server}/sdapi/v1/progress", params={"skip_current_image": "true"}, timeout=5)
        latencies.append(time.monotonic() - started)
        state = progress.json()["state"]
        seen_running |= state["job_count"] >= 1 and progress.json()["progress"] > 0
        time.sleep(0.1)
    worker.join()
    assert result["response"].status_code == 200
    assert seen_running
    assert max(latencies) < 1.0, latencies


def test_a_generation_request_never_blocks_listings(server: str) -> None:
    slow = threading.Thread(
        target=lambda: httpx.post(f"{server}/sdapi/v1/txt2img", json={"steps": 15, "width": 192, "height": 192}, timeout=300)
    )
    slow.start()
    time.sleep(0.3)
    for route in ("sd-models", "samplers", "schedulers", "options", "memory"):
        started = time.monotonic()
        assert httpx.get(f"{server}/sdapi/v1/{route}", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0
    slow.join()


def test_the_classic_img2img_script_runs_unchanged(server: str, tmp_path: Path) -> None:
    init = tmp_path / "in.png"
    Image.new("RGB", (96, 80), (200, 30, 30)).save(init)
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "img2img.py"), str(init), server], cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    # The script sends no size: the model's native size (512 for an SD 1.x checkpoint without metadata).
    assert Image.open(tmp_path / "img2img_0.png").size == (512, 512)
