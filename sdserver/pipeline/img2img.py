"""img2img and inpainting as numbered phases: prepare pixels → encode → noise to the entry level → sample with
the mask held → decode → restore unmasked pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from sdserver.engine.types import GeneratedImage, GenerationRequest, JobControl
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.cfg import CFGDenoiser
from sdserver.pipeline.conditioning import TextEncoderCache
from sdserver.pipeline.denoise import img2img_plan, inpainting_conditioning, make_rng, masked_denoiser
from sdserver.pipeline.denoiser_factory import DenoiserFactory, DenoiserSpec, GuidedFn
from sdserver.pipeline.image_ops import Img2ImgImages, UpscalerFn, finish_img2img_image, latent_mask, prepare_img2img_images
from sdserver.pipeline.images import pil_to_tensor
from sdserver.pipeline.txt2img import (
    GuidedDenoisers, conditioning_options, decode, generated_images, plan_batches, sample_with, schedule_steps,
)
from sdserver.sampling import run
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


def fill_latent(init: torch.Tensor, mask: LatentMask | None, fill: int, rng_noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Latent pre-fills: 2 "latent noise" puts fresh noise under the mask, 3 "latent nothing" zeros it."""
    if mask is None or fill not in (2, 3):
        return init
    under = rng_noise() if fill == 2 else torch.zeros_like(init)
    return init * mask.keep + under * mask.regen


def img2img(
    model: SDModel, request: GenerationRequest, control: JobControl, cache: TextEncoderCache | None = None, *,
    upscaler_fn: UpscalerFn | None = None, inpainting_mask_weight: float = 1.0,
    denoiser_factory: DenoiserFactory | None = None,
) -> tuple[list[GeneratedImage], bool]:
    """`upscaler_fn(image, scale)` enlarges init images smaller than the target (A1111's
    upscaler_for_img2img); None resizes with Lanczos. `denoiser_factory` replaces GuidedDenoisers(cache)."""
    params = request.sampling
    prepared = prepare_pixels(request, upscaler_fn)
    plan = plan_batches(request)
    factory = denoiser_factory or GuidedDenoisers(cache or TextEncoderCache(model, conditioning_options(request)))
    images: list[GeneratedImage] = []
    for index in range(request.n_iter):
        part = plan.batch(index)
        count = part.stop - part.start
        batch_images = [prepared.images[(part.start + k) % len(prepared.images)] for k in range(count)]
        init = encode_images(model, batch_images, request.width, request.height)
        mask = make_latent_mask(prepared, init, request.inpaint.mask_round if request.inpaint else True)
        shape = tuple(init.shape[1:])
        seeds, subseeds = list(plan.seeds[part]), list(plan.subseeds[part])
        rng = make_rng(request.seeds, seeds, subseeds, shape, model.device)  # type: ignore[arg-type]
        sampling_plan = img2img_plan(model, params, request.denoising_strength, request.img2img_fix_steps)
        control.begin_pass(index, request.n_iter, sampling_plan.steps)
        noise = rng.next() * request.initial_noise_multiplier
        fill = request.inpaint.fill if request.inpaint else 1
        start = fill_latent(init, mask, fill, lambda: make_rng(request.seeds, seeds, subseeds, shape, model.device).next())  # type: ignore[arg-type]
        x = run.noised_latent(start, noise, sampling_plan)
        pixels = pil_to_tensor(batch_images)

        def image_cond(on: SDModel) -> torch.Tensor | None:
            if not on.is_inpainting:
                return None
            return inpainting_conditioning(on, pixels, prepared.mask, inpainting_mask_weight, tuple(init.shape[-2:]))

        def wrap(on: SDModel, cfg: CFGDenoiser) -> GuidedFn:
            # A1111 holds the unmasked latent at the first model's encoding, whichever model samples.
            return cfg if mask is None or on.is_inpainting else masked_denoiser(cfg, params.sampler, start, mask.keep, mask.regen)

        batch = factory(DenoiserSpec(
            model, params, plan.prompts[part], plan.negative_prompts[part], request.width, request.height,
            sampling_plan.steps, schedule_steps(request), image_cond, wrap,
        ))
        result = sample_with(batch, params, sampling_plan, x, rng, control, request.preview_method)
        latents = result.latents if mask is None else mask.blend(start, result.latents)
        decoded = decode(batch.model(), latents, request.auto_vae_precision)
        finished = [finish_img2img_image(picture, prepared, part.start + k) for k, picture in enumerate(decoded)]
        images += generated_images(plan, index, finished)
        if result.stopped == "interrupted":
            return images, True
    return images, False
