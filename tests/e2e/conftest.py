"""A real sdserver process on a free loopback port, serving a tiny random checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, *flags: str, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMMANDLINE_ARGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdserver", "--api", "--port", str(port), "--data-dir", str(data_dir), *flags],
        cwd=data_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"sdserver exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(f"{url}/sdserver/v1/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("sdserver did not start in time")


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path) -> Iterator[str]:
    data_dir = tiny_checkpoint.parent.parent.parent
    proc, url = start_server(data_dir, "--precision", "full", "--xformers")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
