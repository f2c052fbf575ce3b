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
from sdserver.pipeline.denoise import guided_denoiser, make_rng, run_sampler
from sdserver.pipeline.images import decode_latents, pil_to_tensor, preview_function, tensor_to_pil
from sdserver.pipeline.txt2img import (
    conditioning_options, decode, guidance_for, plan_batches, sample_batch, schedule_steps, vector_conditioning,
)
from sdserver.sampling import run
from sdserver.sampling.discrete import DiscreteSchedule
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
    cache: TextEncoderCache | None = None, hires_model: SDModel | None = None,
) -> tuple[list[GeneratedImage], bool]:
    """`hires_model` runs the second pass (A1111's hr_checkpoint_name); None: the same model."""
    hires = request.hires
    assert hires is not None
    plan = plan_batches(request)
    cache = cache or TextEncoderCache(model, conditioning_options(request))
    second = (model, cache) if hires_model is None else (
        hires_model, TextEncoderCache(hires_model, conditioning_options(request), cache.embeddings, cache.token_embeds)
    )
    target = hires_target(request.width, request.height, hires)
    params2 = second_pass_sampling(request.sampling, hires)
    first_steps = request.sampling.steps
    images: list[GeneratedImage] = []
    passes = request.n_iter * 2  # A1111 counts both passes of every batch as jobs
    for index in range(request.n_iter):
        control.begin_pass(index * 2, passes, first_steps)
        latents, stopped = sample_batch(model, request, plan, index, cache, control, request.width, request.height)
        part = plan.batch(index)
        if stopped != "interrupted":
            control.begin_pass(index * 2 + 1, passes, params2.steps)
            latents, stopped = second_pass(
                model, second, request, params2, hires, plan, index, control, latents, target, pixel_upscale
            )
        for k, picture in enumerate(decode(second[0] if stopped != "interrupted" else model, latents, request.auto_vae_precision)):
            i = part.start + k
            images.append(GeneratedImage(picture, plan.seeds[i], plan.subseeds[i], plan.prompts[i], plan.negative_prompts[i]))
        if stopped == "interrupted":
            return images, True
    return images, False


def second_pass(  # type: ignore[no-untyped-def]
    first_model, second, request, params2, hires, plan, index, control, latents, target, pixel_upscale
) -> tuple[torch.Tensor, str | None]:
    """The hires pass of one batch: upscale, noise to the entry level, sample with exactly the hires steps."""
    model, cache = second
    part = plan.batch(index)
    init = upscale_first_pass(
        first_model, model, latents, target, hires.upscaler, pixel_upscale, request.auto_vae_precision
    )
    h, w = init.shape[-2:]
    rng = make_rng(request.seeds, list(plan.seeds[part]), list(plan.subseeds[part]), (init.shape[1], h, w), model.device)
    sampling_plan = run.plan_img2img(
        params2.sampler, params2.scheduler, params2.steps, hires.denoising_strength,
        DiscreteSchedule(model.alphas_cumprod), fix_steps=True, sigma_min=params2.sigma_min,
        sigma_max=params2.sigma_max, rho=params2.rho,
        always_discard_next_to_last_sigma=params2.always_discard_next_to_last_sigma, family=model.family,
    )
    x = run.noised_latent(init, rng.next(), sampling_plan)
    prompts = (hires.prompt,) * len(plan.prompts[part]) if hires.prompt else plan.prompts[part]
    negatives = (hires.negative_prompt,) * len(prompts) if hires.negative_prompt else plan.negative_prompts[part]
    steps2 = params2.steps * (2 if SAMPLERS[params2.sampler].second_order else 1)
    # A1111's prompt-editing timeline spans both passes: integer steps past the first pass land in this one.
    guidance = guidance_for(
        cache, prompts, negatives, schedule_steps(request), params2.cfg_scale, params2.s_min_uncond, hires_steps=steps2
    )
    width, height = w * model.latent_scale, h * model.latent_scale
    cfg = guided_denoiser(model, params2.sampler, guidance, vector_conditioning(model, width, height))
    result = run_sampler(params2, sampling_plan, x, rng, cfg, control, preview_function(model, request.preview_method))
    return result.latents, result.stopped
