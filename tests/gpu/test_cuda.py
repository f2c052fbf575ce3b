"""CUDA runs (only where a GPU is present; CI has none): the same request on GPU as on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdserver.engine.types import GenerationRequest, NoiseSource, SamplingParams, SeedParams
from sdserver.models.manager import load_checkpoint
from sdserver.pipeline.txt2img import txt2img

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cpu_noise_gives_the_same_picture_on_cuda_in_fp32_and_close_in_fp16(tiny_checkpoint, control) -> None:  # type: ignore[no-untyped-def]
    request = GenerationRequest(
        prompt="a red circle", width=64, height=64, sampling=SamplingParams(sampler="euler_a", steps=6),
        seeds=SeedParams(seed=9, noise_source=NoiseSource.CPU),
    )
    cpu = load_checkpoint(tiny_checkpoint, torch.float32, torch.device("cpu"))
    cuda32 = load_checkpoint(tiny_checkpoint, torch.float32, torch.device("cuda"))
    cuda16 = load_checkpoint(tiny_checkpoint, torch.float16, torch.device("cuda"))
    reference = np.asarray(txt2img(cpu, request, control)[0][0].image).astype(int)
    assert np.abs(np.asarray(txt2img(cuda32, request, control)[0][0].image).astype(int) - reference).mean() < 1.0
    assert np.abs(np.asarray(txt2img(cuda16, request, control)[0][0].image).astype(int) - reference).mean() < 4.0
