"""A scriptable stand-in engine for the job-layer tests: no torch, deterministic, steps gated by events."""

from __future__ import annotations

import threading
from typing import Callable

import pytest
from PIL import Image

from sdserver.engine.types import (
    CheckpointInfo,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    Interrupted,
    JobControl,
    SamplingParams,
    SeedParams,
    Skipped,
)
from sdserver.jobs import JobQueue

CHECKPOINT = CheckpointInfo(title="stub.safetensors [0123456789]", model_name="stub", name="stub.safetensors",
                            filename="/models/stub.safetensors", hash="0123456789")


class StubEngine:
    """Runs `n_iter` passes of `steps` steps. With `hold=True` every step waits for `release` to be set,
    so a test can look at a job mid-run without sleeping."""

    def __init__(self, *, hold: bool = False, fail_at_step: int | None = None,
                 error: Callable[[], BaseException] | None = None, let_interrupt_escape: bool = False) -> None:
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.in_step = threading.Event()  # set once a step is reached
        self.fail_at_step = fail_at_step
        self.error = error
        self.let_interrupt_escape = let_interrupt_escape
        self.generated: list[int] = []  # seeds, in the order the worker ran them
        self.previews = 0
        self.freed = 0

    def generate(self, request: GenerationRequest, control: JobControl) -> GenerationResult:
        images: list[GeneratedImage] = []
        seed = request.seeds.seed
        interrupted = False
        for batch in range(request.n_iter):
            control.begin_pass(batch, request.n_iter, request.sampling.steps)
            try:
                for step in range(request.sampling.steps):
                    self.in_step.set()
                    self.release.wait(5)
                    if self.fail_at_step == step and self.error is not None:
                        raise self.error()
                    control.step(step, self._preview)
            except Skipped:
                pass
            except Interrupted:
                if self.let_interrupt_escape:
                    raise
                interrupted = True
            for i in range(request.batch_size):
                s = seed + batch * request.batch_size + i
                images.append(GeneratedImage(Image.new("RGB", (8, 8), (s % 256, 0, 0)), s, 0, request.prompt, ""))
            if interrupted:
                break
        self.generated.append(seed)
        return GenerationResult(images=tuple(images), model_name="stub", model_hash="0123456789",
                                interrupted=interrupted)

    def _preview(self) -> Image.Image:
        self.previews += 1
        return Image.new("RGB", (8, 8), (0, 255, 0))

    def free_caches(self) -> None:
        self.freed += 1

    def checkpoints(self) -> list[CheckpointInfo]:
        return [CHECKPOINT]

    def refresh_checkpoints(self) -> None:
        pass

    def current_checkpoint(self) -> CheckpointInfo | None:
        return CHECKPOINT

    def load_checkpoint(self, name: str) -> CheckpointInfo:
        return CHECKPOINT

    def unload(self) -> None:
        pass

    def reload(self) -> None:
        pass

    def default_size(self) -> tuple[int, int]:
        return (512, 512)


def make_request(seed: int = 1, *, steps: int = 3, n_iter: int = 1, batch_size: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt="p", width=64, height=64, batch_size=batch_size, n_iter=n_iter,
                             sampling=SamplingParams(steps=steps), seeds=SeedParams(seed=seed))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stub_engine():
    """Factory for StubEngine(hold=..., fail_at_step=..., error=..., let_interrupt_escape=...)."""
    engines: list[StubEngine] = []

    def make(**kwargs) -> StubEngine:
        engines.append(StubEngine(**kwargs))
        return engines[-1]

    yield make
    for e in engines:
        e.release.set()


@pytest.fixture
def request_of():
    """Factory: request_of(seed, steps=3, n_iter=1, batch_size=1) -> GenerationRequest."""
    return make_request


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine() -> StubEngine:
    return StubEngine()


@pytest.fixture
def held_engine() -> StubEngine:
    engine = StubEngine(hold=True)
    yield engine
    engine.release.set()


@pytest.fixture
def queue_factory():
    made: list[tuple[JobQueue, StubEngine]] = []

    def make(engine: StubEngine, **kwargs) -> JobQueue:
        q = JobQueue(engine, **kwargs)
        q.start()
        made.append((q, engine))
        return q

    yield make
    for q, engine in made:
        engine.release.set()
        q.shutdown(grace=0.5)
