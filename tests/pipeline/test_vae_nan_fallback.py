"""A half-precision VAE decode that overflows is redone in float32 (A1111's auto_vae_precision)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from sdserver.models.manager import load_checkpoint
from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs
from sdserver.pipeline.images import decode_latents, preview_function


@pytest.fixture(scope="module")
def overflowing_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint, stored in fp16, whose VAE's first conv has weights near fp16's maximum: its output
    overflows to inf in fp16 (and the group norm after it makes NaN) but is finite in fp32."""
    state = random_sd1_state_dict(*tiny_sd1_configs(), seed=1, dtype=torch.float16)
    key = "first_stage_model.post_quant_conv.weight"
    state[key] = torch.full_like(state[key], 60000.0)
    return save_checkpoint(state, tmp_path_factory.mktemp("nan") / "overflow.safetensors")


LATENTS = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))


def test_fp16_overflow_is_redone_in_fp32(overflowing_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    half = load_checkpoint(overflowing_checkpoint, torch.float16, "cpu")
    with torch.no_grad():
        assert not torch.isfinite(half.decode_latent(LATENTS)).all()  # the premise: fp16 overflows
    reference = load_checkpoint(overflowing_checkpoint, torch.float16, "cpu", vae_dtype=torch.float32)
    with torch.no_grad():
        want = reference.decode_latent(LATENTS)
    with caplog.at_level(logging.WARNING, logger="sdserver.pipeline.images"):
        got = decode_latents(half, LATENTS)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    # The VAE stays in fp32 for the next decode, the UNet keeps its precision.
    assert next(half.vae.parameters()).dtype == torch.float32
    assert half.dtype == torch.float16
    assert any("float32" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)


def test_without_auto_precision_the_decode_is_returned_as_is(
    overflowing_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    half = load_checkpoint(overflowing_checkpoint, torch.float16, "cpu")
    with caplog.at_level(logging.WARNING, logger="sdserver.pipeline.images"):
        got = decode_latents(half, LATENTS, auto_precision=False)
    assert not torch.isfinite(got).all()
    assert next(half.vae.parameters()).dtype == torch.float16
    assert len(caplog.records) == 1


class FakeModel:
    """A decoder that overflows whenever its VAE is not fp32, counting decodes."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.vae = nn.Linear(1, 1).to(dtype)
        self.decodes: list[torch.dtype] = []
        self.family = "sd1"

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        dtype = self.vae.weight.dtype
        self.decodes.append(dtype)
        value = 0.5 if dtype == torch.float32 else float("nan")
        return torch.full((latent.shape[0], 3, 8, 8), value)


def test_a_finite_decode_is_not_redone(caplog: pytest.LogCaptureFixture) -> None:
    model = FakeModel(torch.float32)
    with caplog.at_level(logging.WARNING):
        decode_latents(model, torch.zeros(1, 4, 1, 1))
    assert model.decodes == [torch.float32]
    assert caplog.records == []


def test_an_fp32_vae_that_overflows_is_not_retried() -> None:
    model = FakeModel(torch.float32)
    model.decode_latent = lambda latent: torch.full((1, 3, 8, 8), float("nan"))  # type: ignore[method-assign]
    assert torch.isnan(decode_latents(model, torch.zeros(1, 4, 1, 1))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_vaes_fall_back(dtype: torch.dtype) -> None:
    model = FakeModel(dtype)
    out = decode_latents(model, torch.zeros(2, 4, 1, 1))
    assert model.decodes == [dtype, torch.float32]
    assert out.shape == (2, 3, 8, 8) and torch.all(out == 0.5)


def test_full_previews_use_the_fallback() -> None:
    model = FakeModel(torch.float16)
    image = preview_function(model, "Full")(torch.zeros(4, 1, 1))
    assert model.decodes == [torch.float16, torch.float32]
    assert image.getpixel((0, 0)) == (191, 191, 191)


@pytest.mark.parametrize("auto", [True, False])
def test_txt2img_final_decode_follows_the_request(overflowing_checkpoint: Path, control, auto: bool) -> None:  # type: ignore[no-untyped-def]
    from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
    from sdserver.pipeline.txt2img import txt2img

    half = load_checkpoint(overflowing_checkpoint, torch.float16, "cpu")
    request = GenerationRequest(
        prompt="a cat", width=32, height=32, sampling=SamplingParams(sampler="euler", steps=2, cfg_scale=7.0),
        seeds=SeedParams(seed=1), auto_vae_precision=auto,
    )
    result = txt2img(half, request, control)
    images = result[0] if isinstance(result, tuple) else result
    # A NaN decode becomes black pixels; the fp32 redo gives the random VAE's usual mid-grey noise.
    assert (max(img.image.getextrema()[0][1] for img in images) > 0) is auto
    assert (next(half.vae.parameters()).dtype == torch.float32) is auto
