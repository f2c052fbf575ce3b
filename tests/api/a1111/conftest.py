"""Fakes for the A1111 edge tests: images and results built in memory, no engine."""

from __future__ import annotations

import base64
import io
import itertools
from typing import Callable

import pytest
from PIL import Image

from sdserver.api.a1111.images import decode_image
from sdserver.engine.types import GeneratedImage, GenerationRequest, GenerationResult
from sdserver.api.a1111.translate import planned_seeds


def png_b64(size=(16, 16), color=(200, 30, 30), mode="RGB", fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def fake_result(gen: GenerationRequest, *, model_name="v1-5-pruned-emaonly", model_hash="6ce0161689",
                count: int | None = None, **kwargs) -> GenerationResult:
    """What an engine would return for `gen`: one image per planned seed (or the first `count`)."""
    seeds, subseeds = planned_seeds(gen.seeds, gen.image_count)
    n = gen.image_count if count is None else count
    images = tuple(
        GeneratedImage(Image.new("RGB", (gen.width, gen.height), (i * 40 % 256, 80, 120)), seeds[i], subseeds[i],
                       gen.prompt, gen.negative_prompt)
        for i in range(n)
    )
    return GenerationResult(images=images, model_name=model_name, model_hash=model_hash, **kwargs)


@pytest.fixture
def make_png() -> Callable[..., str]:
    return png_b64


@pytest.fixture
def make_result() -> Callable[..., GenerationResult]:
    return fake_result


@pytest.fixture
def seed_source() -> Callable[[], int]:
    """Deterministic 'random' seeds: 1000, 1001, ..."""
    counter = itertools.count(1000)
    return lambda: next(counter)


@pytest.fixture
def decoder() -> Callable[[str, str], Image.Image]:
    return lambda data, field: decode_image(data, field, max_pixels=4096 * 4096)
