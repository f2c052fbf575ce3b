"""img2img, inpainting and hires fix through the real loader and VAE on a tiny random checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdserver.engine.types import GenerationRequest, HiresParams, InpaintParams, SamplingParams, SeedParams
from sdserver.models.manager import load_checkpoint
from sdserver.pipeline.hires import hires_target, txt2img_hires
from sdserver.pipeline.img2img import img2img
from sdserver.upscalers.builtin import resize_builtin


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # type: ignore[no-untyped-def]
    return load_checkpoint(tiny_checkpoint, torch.float32, torch.device("cpu"))


def init_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (30, 60, 200))
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(220, 20, 20))
    return img


def request(**kw) -> GenerationRequest:  # type: ignore[no-untyped-def]
    base = GenerationRequest(
        prompt="a red circle", width=64, height=64, init_images=(init_image(),), denoising_strength=0.75,
        sampling=SamplingParams(sampler="euler", scheduler="automatic", steps=8, cfg_scale=5.0),
        seeds=SeedParams(seed=7),
    )
    return replace(base, **kw)


def test_img2img_steps_follow_a1111(model, control) -> None:  # type: ignore[no-untyped-def]
    images, _ = img2img(model, request(denoising_strength=0.75), control)
    assert images[0].image.size == (64, 64)
    # int(0.75 * 8) + 1 steps run.
    assert control.passes == [(0, 1, 7)]
    assert control.steps == list(range(7))


def test_one_init_image_fills_the_batch_and_seeds_differ(model, control) -> None:  # type: ignore[no-untyped-def]
    images, _ = img2img(model, request(batch_size=2), control)
    assert [g.seed for g in images] == [7, 8]
    assert not np.array_equal(np.asarray(images[0].image), np.asarray(images[1].image))


def test_inpainting_never_changes_pixels_outside_the_blurred_mask(model, control) -> None:  # type: ignore[no-untyped-def]
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((24, 24, 40, 40), fill=255)
    inpaint = InpaintParams(mask=mask, mask_blur_x=2, mask_blur_y=2, fill=1)
    out = np.asarray(img2img(model, request(inpaint=inpaint, denoising_strength=1.0), control)[0][0].image)
    original = np.asarray(init_image())
    # The blur (sigma 2 → kernel 11) reaches at most 5 px past the rectangle.
    outside = np.ones((64, 64), dtype=bool)
    outside[24 - 6 : 41 + 6, 24 - 6 : 41 + 6] = False
    assert np.array_equal(out[outside], original[outside])
    assert not np.array_equal(out[30:35, 30:35], original[30:35, 30:35])


def test_inpaint_full_res_returns_the_original_size(model, control) -> None:  # type: ignore[no-untyped-def]
    big = init_image((96, 80))
    mask = Image.new("L", (96, 80), 0)
    ImageDraw.Draw(mask).rectangle((10, 10, 30, 30), fill=255)
    inpaint = InpaintParams(mask=mask, full_res=True, full_res_padding=8)
    out = img2img(model, request(init_images=(big,), inpaint=inpaint), control)[0][0].image
    assert out.size == (96, 80)
    assert np.array_equal(np.asarray(out)[60:, 60:], np.asarray(big)[60:, 60:])


@pytest.mark.parametrize("resize_mode", [0, 1, 2, 3])
def test_resize_modes_give_the_requested_size(model, control, resize_mode) -> None:  # type: ignore[no-untyped-def]
    out = img2img(model, request(init_images=(init_image((80, 48)),), resize_mode=resize_mode), control)[0][0].image
    assert out.size == (64, 64)


def test_hires_target_sizes() -> None:
    assert hires_target(64, 48, HiresParams(scale=2.0)) == hires_target(64, 48, HiresParams(resize_x=128))
    assert (hires_target(64, 48, HiresParams(scale=1.5)).width, hires_target(64, 48, HiresParams(scale=1.5)).height) == (96, 72)
    crop = hires_target(64, 64, HiresParams(resize_x=128, resize_y=64))
    assert (crop.width, crop.height, crop.crop_x, crop.crop_y) == (128, 128, 0, 4)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos", "Nearest", "None"])
def test_hires_fix_has_the_second_pass_size_and_runs_both_passes(model, control, upscaler) -> None:  # type: ignore[no-untyped-def]
    req = GenerationRequest(
        prompt="a red circle", width=64, height=48, sampling=SamplingParams(sampler="euler_a", steps=4),
        seeds=SeedParams(seed=3), hires=HiresParams(scale=1.5, upscaler=upscaler, second_pass_steps=3, denoising_strength=0.5),
    )
    images, _ = txt2img_hires(model, req, control, lambda img, w, h, name: resize_builtin(img, w, h, name))
    assert images[0].image.size == (96, 72)
    assert control.passes == [(0, 2, 4), (1, 2, 3)]
    assert control.steps == [0, 1, 2, 3, 0, 1, 2]
