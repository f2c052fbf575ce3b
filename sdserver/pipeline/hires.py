"""txt2img's highres fix: a first pass at the request's size, an upscale (in latent or pixel space), then an
img2img pass at the target size with exactly the hires step count (A1111 §6.2)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from PIL import Image

from sdserver.engine.types import GeneratedImage, GenerationRequest, HiresParams, JobControl, SamplingParams
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.conditioning import TextEncoderCache
from sdserver.pipeline.denoise import img2img_plan, make_rng, txt2img_image_conditioning
from sdserver.pipeline.denoiser_factory import DenoiserFactory, DenoiserSpec
from sdserver.pipeline.images import decode_latents, pil_to_tensor, tensor_to_pil
from sdserver.pipeline.txt2img import (
    GuidedDenoisers, conditioning_options, decode, generated_images, plan_batches, sample_batch, sample_with,
    schedule_steps,
)
from sdserver.sampling import run
from sdserver.sampling.registry import SAMPLERS
from sdserver.upscalers.latent import is_latent_mode, upscale_latent

PixelUpscale = Callable[[Image.Image, int, int, str], Image.Image]


@dataclass(frozen=True)
class HiresTarget:
    width: int
    height: int
    # Latent-space centre crop when both hr_resize_x and hr_resize_y are given (A1111's truncate_x/y).
    crop_x: int = 0
    crop_y: int = 0


def hires_target(width: int, height: int, hires: HiresParams) -> HiresTarget:
    """A1111's calculate_target_resolution."""
    rx, ry = hires.resize_x, hires.resize_y
    if rx == 0 and ry == 0:
        return HiresTarget(int(width * hires.scale), int(height * hires.scale))
    if ry == 0:
        return HiresTarget(rx, rx * height // width)
    if rx == 0:
        return HiresTarget(ry * width // height, ry)
    # Upscale to cover the target, then crop the overflow (in latent cells).
    src_ratio, dst_ratio = width / height, rx / ry
    if src_ratio < dst_ratio:
        w, h = rx, rx * height // width
    else:
        w, h = ry * width // height, ry
    return HiresTarget(w, h, (w - rx) // 2 // 8, (h - ry) // 2 // 8)


def second_pass_sampling(params: SamplingParams, hires: HiresParams) -> SamplingParams:
    return replace(
        params,
        sampler=hires.sampler or params.sampler,
        scheduler=hires.scheduler or (params.scheduler if not hires.sampler else "automatic"),
        steps=hires.second_pass_steps or params.steps,
        cfg_scale=hires.cfg_scale if hires.cfg_scale is not None else params.cfg_scale,
    )


@torch.no_grad()
def upscale_first_pass(
    first: SDModel, second: SDModel, latents: torch.Tensor, target: HiresTarget, upscaler: str,
    pixel_upscale: PixelUpscale, auto_precision: bool = True,
) -> torch.Tensor:
    """Latent modes interpolate the latent; pixel upscalers decode with the first model, encode with the second."""
    scale = first.latent_scale
    if is_latent_mode(upscaler):
        out = upscale_latent(latents, target.width // scale, target.height // scale, upscaler)
    else:
        images = tensor_to_pil(decode_latents(first, latents, auto_precision=auto_precision))
        big = [pixel_upscale(img, target.width, target.height, upscaler) for img in images]
        out = second.encode_image(pil_to_tensor(big).to(second.device))
    if target.crop_x or target.crop_y:
        h, w = out.shape[-2:]
        out = out[..., target.crop_y : h - target.crop_y, target.crop_x : w - target.crop_x]
    return out


def txt2img_hires(
    model: SDModel, request: GenerationRequest, control: JobControl, pixel_upscale: PixelUpscale,
    cache: TextEncoderCache | None = None, hires_model: SDModel | None = None, *,
    denoiser_factory: DenoiserFactory | None = None,
) -> tuple[list[GeneratedImage], bool]:
    """`hires_model` runs the second pass (A1111's hr_checkpoint_name); None: the model the first pass ended
    on. `denoiser_factory` replaces GuidedDenoisers in both passes, and must know every model it is handed."""
    hires = request.hires
    assert hires is not None
    plan = plan_batches(request)
    if denoiser_factory is None:
        first_factory, second_factory = guided_denoisers(model, request, cache, hires_model)
    else:
        first_factory = second_factory = denoiser_factory
    target = hires_target(request.width, request.height, hires)
    params2 = second_pass_sampling(request.sampling, hires)
    images: list[GeneratedImage] = []
    passes = request.n_iter * 2  # A1111 counts both passes of every batch as jobs
    for index in range(request.n_iter):
        control.begin_pass(index * 2, passes, request.sampling.steps)
        latents, stopped, ended_on = sample_batch(
            model, request, plan, index, first_factory, control, request.width, request.height
        )
        if stopped != "interrupted":
            control.begin_pass(index * 2 + 1, passes, params2.steps)
            latents, stopped, ended_on = second_pass(
                ended_on, hires_model or ended_on, second_factory, request, params2, hires, plan, index, control,
                latents, target, pixel_upscale,
            )
        images += generated_images(plan, index, decode(ended_on, latents, request.auto_vae_precision))
        if stopped == "interrupted":
            return images, True
    return images, False


def guided_denoisers(
    model: SDModel, request: GenerationRequest, cache: TextEncoderCache | None, hires_model: SDModel | None
) -> tuple[DenoiserFactory, DenoiserFactory]:
    """The default factories of the two passes; a hires checkpoint gets a cache sharing the embeddings."""
    cache = cache or TextEncoderCache(model, conditioning_options(request))
    if hires_model is None:
        return GuidedDenoisers(cache), GuidedDenoisers(cache)
    hires_cache = TextEncoderCache(hires_model, conditioning_options(request), cache.embeddings, cache.token_embeds)
    return GuidedDenoisers(cache), GuidedDenoisers(hires_cache)


def second_pass(  # type: ignore[no-untyped-def]
    first_model, model, factory, request, params2, hires, plan, index, control, latents, target, pixel_upscale
) -> tuple[torch.Tensor, str | None, SDModel]:
    """The hires pass of one batch on `model`: upscale, noise to the entry level, sample with exactly the hires
    steps. Returns the latents, how sampling stopped and the model it ended on."""
    part = plan.batch(index)
    init = upscale_first_pass(
        first_model, model, latents, target, hires.upscaler, pixel_upscale, request.auto_vae_precision
    )
    h, w = init.shape[-2:]
    rng = make_rng(request.seeds, list(plan.seeds[part]), list(plan.subseeds[part]), (init.shape[1], h, w), model.device)
    sampling_plan = img2img_plan(model, params2, hires.denoising_strength, fix_steps=True)
    x = run.noised_latent(init, rng.next(), sampling_plan)
    prompts = (hires.prompt,) * len(plan.prompts[part]) if hires.prompt else plan.prompts[part]
    negatives = (hires.negative_prompt,) * len(prompts) if hires.negative_prompt else plan.negative_prompts[part]
    width, height = w * model.latent_scale, h * model.latent_scale
    batch = factory(DenoiserSpec(
        model, params2, prompts, negatives, width, height, sampling_plan.steps, schedule_steps(request),
        # A1111's hires pass hands inpainting models the whole upscaled image masked, i.e. grey.
        lambda on: txt2img_image_conditioning(on, len(prompts), width, height),
        # A1111's prompt-editing timeline spans both passes: integer steps past the first pass land in this one.
        hires_steps=params2.steps * (2 if SAMPLERS[params2.sampler].second_order else 1),
    ))
    result = sample_with(batch, params2, sampling_plan, x, rng, control, request.preview_method)
    return result.latents, result.stopped, batch.model()
