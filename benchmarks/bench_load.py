"""Sustained requests per minute and p50/p95 latency of tiny-model txt2img jobs at 1, 8 and 50 concurrent clients.

    python benchmarks/bench_load.py [--requests 60] [--steps 4] [--size 64]

Builds a tiny random SD 1.x checkpoint, starts a real `sdserver` process on a free loopback port, and drives
it with threads posting A1111 txt2img bodies. Every client checks that it got the image of its own seed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_checkpoint(root: Path) -> None:
    from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs

    unet, vae, text = tiny_sd1_configs()
    path = root / "models" / "Stable-diffusion" / "tiny.safetensors"
    path.parent.mkdir(parents=True)
    save_checkpoint(random_sd1_state_dict(unet=unet, vae=vae, text=text, seed=0), path)


def start(root: Path) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdserver", "--api", "--port", str(port), "--data-dir", str(root),
         "--precision", "full", "--queue-size", "256"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "COMMANDLINE_ARGS": ""},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/sdserver/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def run_level(url: str, clients: int, total: int, steps: int, size: int) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                seed = 1000 + index
                started = time.perf_counter()
                r = http.post(f"{url}/sdapi/v1/txt2img", json={
                    "prompt": "a red circle", "seed": seed, "steps": steps, "width": size, "height": size})
                elapsed = time.perf_counter() - started
                with lock:
                    if r.status_code != 200 or json.loads(r.json()["info"])["seed"] != seed or not base64.b64decode(r.json()["images"][0]):
                        errors.append(f"{r.status_code} seed {seed}")
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": len(latencies), "errors": len(errors),
        "per_minute": 60 * len(latencies) / wall,
        "p50": statistics.median(ordered), "p95": ordered[max(int(0.95 * len(ordered)) - 1, 0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per concurrency level (at least clients)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_checkpoint(root)
        proc, url = start(root)
        try:
            httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64}, timeout=600)  # warm-up
            print(f"tiny SD 1.x, {args.size}x{args.size}, {args.steps} steps, Euler, one worker")
            print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/min':>8} {'p50 s':>7} {'p95 s':>7}")
            for clients in (1, 8, 50):
                row = run_level(url, clients, max(args.requests, clients), args.steps, args.size)
                print(f"{row['clients']:>7} {row['requests']:>8} {row['errors']:>6} {row['per_minute']:>8.1f} "
                      f"{row['p50']:>7.2f} {row['p95']:>7.2f}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
