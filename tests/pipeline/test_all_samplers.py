"""Every sampler with every scheduler runs through txt2img on a tiny checkpoint and gives a finite image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
from sdserver.models.manager import load_checkpoint
from sdserver.pipeline.txt2img import txt2img
from sdserver.sampling.registry import SAMPLERS, SCHEDULERS


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # type: ignore[no-untyped-def]
    return load_checkpoint(tiny_checkpoint, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_with_every_scheduler(model, control, sampler) -> None:  # type: ignore[no-untyped-def]
    outputs = {}
    for scheduler in SCHEDULERS:
        request = GenerationRequest(
            prompt="a red circle", width=32, height=32, seeds=SeedParams(seed=3),
            sampling=SamplingParams(sampler=sampler, scheduler=scheduler, steps=4, cfg_scale=5.0),
        )
        images, interrupted = txt2img(model, request, control)
        pixels = np.asarray(images[0].image)
        assert not interrupted and pixels.shape == (32, 32, 3)
        outputs[scheduler] = pixels
    # Deterministic: the same request gives the same image.
    again, _ = txt2img(model, request, control)
    assert np.array_equal(np.asarray(again[0].image), outputs[scheduler])
