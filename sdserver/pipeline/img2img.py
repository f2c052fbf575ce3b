"""img2img and inpainting as numbered phases: prepare pixels → encode → noise to the entry level → sample with
the mask held → decode → restore unmasked pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from sdserver.engine.types import GeneratedImage, GenerationRequest, JobControl
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.conditioning import TextEncoderCache
from sdserver.pipeline.denoise import guided_denoiser, make_rng, masked_denoiser, run_sampler
from sdserver.pipeline.image_ops import Img2ImgImages, UpscalerFn, finish_img2img_image, latent_mask, prepare_img2img_images
from sdserver.pipeline.images import decode_latents, pil_to_tensor, preview_function, tensor_to_pil
from sdserver.pipeline.txt2img import (
    conditioning_options, guidance_for, plan_batches, schedule_steps, vector_conditioning,
)
from sdserver.sampling import run
from sdserver.sampling.discrete import DiscreteSchedule
from sdserver.upscalers.latent import upscale_latent

@dataclass(frozen=True)
class LatentMask:
    """`keep` is 1 where the input's latent is held (A1111's `mask`), `regen` is 1 where it is regenerated."""

    keep: torch.Tensor  # [1, 1, h, w]
    regen: torch.Tensor

    def blend(self, init: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return init * self.keep + x * self.regen


def prepare_pixels(request: GenerationRequest, upscaler_fn: UpscalerFn | None) -> Img2ImgImages:
    """Phase 1: resize, crop for "only masked", blur and invert the mask, pre-fill the masked area."""
    inpaint = request.inpaint
    if inpaint is None:
        return prepare_img2img_images(
            request.init_images, request.width, request.height, resize_mode=request.resize_mode, upscaler_fn=upscaler_fn
        )
    return prepare_img2img_images(
        request.init_images, request.width, request.height, resize_mode=request.resize_mode, mask=inpaint.mask,
        blur_x=inpaint.mask_blur_x, blur_y=inpaint.mask_blur_y, invert=inpaint.invert, fill=inpaint.fill,
        full_res=inpaint.full_res, padding=inpaint.full_res_padding, round=inpaint.mask_round,
        upscaler_fn=upscaler_fn,
    )


@torch.no_grad()
def encode_images(model: SDModel, images: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """Phase 2: VAE-encode the init images; images at another size (resize mode 3) are resized as latents."""
    latent = model.encode_image(pil_to_tensor(images).to(model.device))
    h, w = height // model.latent_scale, width // model.latent_scale
    if latent.shape[-2:] != (h, w):
        latent = upscale_latent(latent, w, h, "Latent", field="resize_mode")
    return latent


def make_latent_mask(prepared: Img2ImgImages, latent: torch.Tensor, round_mask: bool) -> LatentMask | None:
    if prepared.mask is None:
        return None
    h, w = latent.shape[-2:]
    regen = torch.from_numpy(latent_mask(prepared.mask, w, h, round=round_mask)).to(latent.device)[None, None]
    return LatentMask(keep=1.0 - regen, regen=regen)


@torch.no_grad()
def inpainting_conditioning(
    model: SDModel, pixels: torch.Tensor, mask: Image.Image | None, weight: float, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Extra UNet input of 9-channel inpainting models: the mask and the latent of the masked image.

    `weight` is A1111's inpainting_mask_weight: 1 hides the masked pixels fully, 0 shows the whole image.
    """
    b, _, height, width = pixels.shape
    if mask is None:
        pixel_mask = torch.ones(1, 1, height, width)
    else:
        arr = np.asarray(mask.convert("L").resize((width, height)), dtype=np.float32) / 255.0
        pixel_mask = torch.from_numpy(np.round(arr))[None, None]
    masked = torch.lerp(pixels, pixels * (1.0 - pixel_mask), weight)
    cond_latent = model.encode_image(masked.to(model.device))
    small_mask = torch.nn.functional.interpolate(pixel_mask, size=latent_hw).to(cond_latent.device)
    return torch.cat([small_mask.expand(b, -1, -1, -1), cond_latent], dim=1)


def fill_latent(init: torch.Tensor, mask: LatentMask | None, fill: int, rng_noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Latent pre-fills: 2 "latent noise" puts fresh noise under the mask, 3 "latent nothing" zeros it."""
    if mask is None or fill not in (2, 3):
        return init
    under = rng_noise() if fill == 2 else torch.zeros_like(init)
    return init * mask.keep + under * mask.regen


def img2img(
    model: SDModel, request: GenerationRequest, control: JobControl, cache: TextEncoderCache | None = None, *,
    upscaler_fn: UpscalerFn | None = None, inpainting_mask_weight: float = 1.0,
) -> tuple[list[GeneratedImage], bool]:
    """`upscaler_fn(image, scale)` enlarges init images smaller than the target (A1111's
    upscaler_for_img2img); None resizes with Lanczos."""
    params = request.sampling
    prepared = prepare_pixels(request, upscaler_fn)
    plan = plan_batches(request)
    cache = cache or TextEncoderCache(model, conditioning_options(request))
    sched = DiscreteSchedule(model.alphas_cumprod)
    images: list[GeneratedImage] = []
    for index in range(request.n_iter):
        part = plan.batch(index)
        count = part.stop - part.start
        batch_images = [prepared.images[(part.start + k) % len(prepared.images)] for k in range(count)]
        init = encode_images(model, batch_images, request.width, request.height)
        mask = make_latent_mask(prepared, init, request.inpaint.mask_round if request.inpaint else True)
        shape = tuple(init.shape[1:])
        rng = make_rng(request.seeds, list(plan.seeds[part]), list(plan.subseeds[part]), shape, model.device)
        sampling_plan = run.plan_img2img(
            params.sampler, params.scheduler, params.steps, request.denoising_strength, sched,
            fix_steps=request.img2img_fix_steps, sigma_min=params.sigma_min, sigma_max=params.sigma_max,
            rho=params.rho, always_discard_next_to_last_sigma=params.always_discard_next_to_last_sigma,
            family=model.family,
        )
        control.begin_pass(index, request.n_iter, sampling_plan.steps)
        noise = rng.next() * request.initial_noise_multiplier
        fill = request.inpaint.fill if request.inpaint else 1
        start = fill_latent(init, mask, fill, lambda: make_rng(
            request.seeds, list(plan.seeds[part]), list(plan.subseeds[part]), shape, model.device).next())
        x = run.noised_latent(start, noise, sampling_plan)
        image_cond = None
        if model.is_inpainting:
            pixels = pil_to_tensor(batch_images)
            image_cond = inpainting_conditioning(model, pixels, prepared.mask, inpainting_mask_weight, tuple(init.shape[-2:]))
        guidance = guidance_for(
            cache, plan.prompts[part], plan.negative_prompts[part], schedule_steps(request), params.cfg_scale,
            params.s_min_uncond, image_cond,
        )
        cfg = guided_denoiser(model, params.sampler, guidance, vector_conditioning(model, request.width, request.height))
        denoiser = cfg if mask is None or model.is_inpainting else masked_denoiser(cfg, params.sampler, start, mask.keep, mask.regen)
        result = run_sampler(params, sampling_plan, x, rng, denoiser, control, preview_function(model, request.preview_method))
        latents = result.latents if mask is None else mask.blend(start, result.latents)
        with torch.no_grad():
            decoded = tensor_to_pil(decode_latents(model, latents, auto_precision=request.auto_vae_precision))
        for k, picture in enumerate(decoded):
            i = part.start + k
            final = finish_img2img_image(picture, prepared, i)
            images.append(GeneratedImage(final, plan.seeds[i], plan.subseeds[i], plan.prompts[i], plan.negative_prompts[i]))
        if result.stopped == "interrupted":
            return images, True
    return images, False


