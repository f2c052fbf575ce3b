"""A fake engine and app clients for the API tests: solid-colour images per seed, no torch, tiny sleeps."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdserver.app import ServerControl, create_app
from sdserver.engine.types import (
    CheckpointInfo,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    Interrupted,
    JobControl,
    Skipped,
)
from sdserver.errors import ModelNotFound, NoModelAvailable
from sdserver.settings import Settings

CHECKPOINTS = (
    CheckpointInfo(title="alpha.safetensors [aaaaaaaaaa]", model_name="alpha", name="alpha.safetensors",
                   filename="/models/alpha.safetensors", hash="aaaaaaaaaa", sha256="a" * 64),
    CheckpointInfo(title="beta.safetensors [bbbbbbbbbb]", model_name="beta", name="beta.safetensors",
                   filename="/models/beta.safetensors", hash="bbbbbbbbbb", sha256="b" * 64),
)


def seed_colour(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)


@dataclass(frozen=True)
class FakeUpscaler:
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = 4


class FakeEngine:
    """Draws one solid colour per seed. `hold()` makes every step wait for `release`; `fail_with` raises at
    `fail_at_step`; `checkpoints_present=False` behaves as a server without any model."""

    def __init__(self, *, step_delay: float = 0.001, checkpoints_present: bool = True) -> None:
        self.step_delay = step_delay
        self.release = threading.Event()
        self.release.set()
        self.in_step = threading.Event()
        self.fail_with: Callable[[], BaseException] | None = None
        self.fail_at_step = 0
        self.available = CHECKPOINTS if checkpoints_present else ()
        self.loaded: CheckpointInfo | None = self.available[0] if self.available else None
        self.unloaded = False
        self.freed = 0
        self.loads: list[str] = []
        self.refreshes = 0
        self.vaes: list[Path] = []
        self.generated: list[int] = []  # first seed of each generate call, in the order they ran

    # Listings of the files besides checkpoints: this engine has none.
    def upscaler_list(self) -> list[Any]:
        return [FakeUpscaler(name) for name in ("None", "Lanczos", "Nearest")]

    def realesrgan_models(self) -> list[Any]:
        return []

    def lora_list(self) -> list[dict[str, Any]]:
        return []

    def embedding_listing(self) -> dict[str, dict[str, Any]]:
        return {"loaded": {}, "skipped": {}}

    def vae_list(self) -> list[Any]:
        return list(self.vaes)

    def extras(self, image: Image.Image, params: Any) -> tuple[Image.Image, str]:
        scale = params.upscaling_resize
        return image.resize((int(image.width * scale), int(image.height * scale))), "<p></p>"

    def hold(self) -> FakeEngine:
        self.release.clear()
        self.in_step.clear()
        return self

    def generate(self, request: GenerationRequest, control: JobControl) -> GenerationResult:
        if self.loaded is None:
            raise NoModelAvailable("No checkpoint found: put a .safetensors file in models/Stable-diffusion")
        if request.checkpoint:
            self.load_checkpoint(request.checkpoint)
        self.generated.append(request.seeds.seed)
        images: list[GeneratedImage] = []
        interrupted = False
        for batch in range(request.n_iter):
            control.begin_pass(batch, request.n_iter, request.sampling.steps)
            try:
                for step in range(request.sampling.steps):
                    self.in_step.set()
                    self.release.wait(10)
                    time.sleep(self.step_delay)
                    if self.fail_with is not None and step == self.fail_at_step:
                        raise self.fail_with()
                    control.step(step, lambda: Image.new("RGB", (8, 8), (0, 255, 0)))
            except Skipped:
                pass
            except Interrupted:
                interrupted = True
            for i in range(request.batch_size):
                seed = request.seeds.seed + batch * request.batch_size + i
                image = Image.new("RGB", (request.width, request.height), seed_colour(seed))
                images.append(GeneratedImage(image, seed, request.seeds.subseed, request.prompt,
                                             request.negative_prompt))
            if interrupted:
                break
        return GenerationResult(images=tuple(images), model_name=self.loaded.model_name,
                                model_hash=self.loaded.hash, interrupted=interrupted)

    def free_caches(self) -> None:
        self.freed += 1

    def checkpoints(self) -> list[CheckpointInfo]:
        return list(self.available)

    def refresh_checkpoints(self) -> None:
        self.refreshes += 1

    def current_checkpoint(self) -> CheckpointInfo | None:
        return self.loaded

    def load_checkpoint(self, name: str) -> CheckpointInfo:
        for c in self.available:
            if name in (c.title, c.name, c.model_name, c.hash, c.sha256):
                self.loads.append(c.title)
                self.loaded = c
                return c
        raise ModelNotFound(f"Checkpoint {name!r} not found", field="sd_model_checkpoint")

    def unload(self) -> None:
        self.unloaded = True

    def reload(self) -> None:
        self.unloaded = False

    def default_size(self) -> tuple[int, int]:
        return (64, 64)


class RecordingControl:
    def __init__(self) -> None:
        self.stops = 0
        self.kills = 0

    def control(self) -> ServerControl:
        return ServerControl(stop=self._stop, kill=self._kill)

    def _stop(self) -> None:
        self.stops += 1

    def _kill(self) -> None:
        self.kills += 1


@pytest.fixture
def fake_engine() -> Callable[..., FakeEngine]:
    """Factory: fake_engine(step_delay=..., checkpoints_present=...)."""
    made: list[FakeEngine] = []

    def make(**kwargs) -> FakeEngine:
        made.append(FakeEngine(**kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.release.set()


@pytest.fixture
def recorder() -> RecordingControl:
    return RecordingControl()


@pytest.fixture
def make_client(tmp_path, fake_engine, recorder):
    """Factory: make_client(engine=None, **settings) -> a started TestClient over create_app."""
    clients: list[tuple[TestClient, FakeEngine]] = []

    def make(engine: FakeEngine | None = None, raise_server_exceptions: bool = True, **settings) -> TestClient:
        engine = engine or fake_engine()
        settings.setdefault("data_dir", tmp_path)
        settings.setdefault("shutdown_grace", 1.0)
        app = create_app(Settings(**settings), engine=engine, control=recorder.control())
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        clients.append((client, engine))
        return client

    yield make
    for client, engine in clients:
        engine.release.set()
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def engine_of():
    """engine_of(client) -> the FakeEngine behind a client."""
    return lambda client: client.app.state.engine
