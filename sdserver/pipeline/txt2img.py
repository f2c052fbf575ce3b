"""txt2img as numbered phases: prompts and seeds → conditioning → noise → sampling → decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdserver.engine.types import GeneratedImage, GenerationRequest, JobControl
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.cfg import Guidance
from sdserver.pipeline.conditioning import (
    ConditioningOptions, TextEncoderCache, condition_prompt, is_empty_prompt, map_text_conditioning, zeroed,
)
from sdserver.pipeline.denoise import guided_denoiser, make_rng, run_sampler, txt2img_plan
from sdserver.pipeline.images import decode_latents, preview_function, tensor_to_pil
from sdserver.sampling import run
from sdserver.sampling.registry import SAMPLERS


@dataclass(frozen=True)
class BatchPlan:
    """Phase 1: which prompt and seeds each image of each batch gets (A1111's all_seeds rule)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]
    batch_size: int

    def batch(self, index: int) -> slice:
        return slice(index * self.batch_size, (index + 1) * self.batch_size)


def plan_batches(request: GenerationRequest) -> BatchPlan:
    n, s = request.image_count, request.seeds
    # With a variation seed every image shares the main seed and the subseeds vary (A1111).
    seeds = [s.seed] * n if s.subseed_strength else [s.seed + i for i in range(n)]
    return BatchPlan(
        (request.prompt,) * n, (request.negative_prompt,) * n, tuple(seeds),
        tuple(s.subseed + i for i in range(n)), request.batch_size,
    )


def conditioning_options(request: GenerationRequest) -> ConditioningOptions:
    return ConditioningOptions(clip_skip=request.clip_skip, emphasis=request.emphasis)


def schedule_steps(request: GenerationRequest) -> int:
    """Prompt-editing steps count denoiser calls: twice the steps for second-order samplers (A1111)."""
    steps = request.sampling.steps
    return steps * 2 if SAMPLERS[request.sampling.sampler].second_order else steps


def guidance_for(
    cache: TextEncoderCache, prompts: tuple[str, ...], negatives: tuple[str, ...], steps: int, cfg_scale: float,
    s_min_uncond: float, image_cond: torch.Tensor | None = None, hires_steps: int | None = None,
) -> Guidance:
    conds = tuple(condition_prompt(cache, p, steps, hires_steps=hires_steps) for p in prompts)
    unconds = tuple(condition_prompt(cache, n, steps, allow_and=False, hires_steps=hires_steps) for n in negatives)
    if cache.model.spec.uses_pooled and all(is_empty_prompt(n) for n in negatives):
        # SDXL-style models get zeros, not the encoding of "", when a batch has no negative prompt (A1111).
        unconds = tuple(map_text_conditioning(u, zeroed) for u in unconds)
    return Guidance(conds, unconds, cfg_scale, s_min_uncond, image_cond)


def vector_conditioning(model: SDModel, width: int, height: int):  # type: ignore[no-untyped-def]
    """SDXL-style models take pooled text plus size embeddings as a vector; others take none."""
    if not model.spec.uses_pooled:
        return None
    return lambda pooled: model.vector_conditioning(pooled, width=width, height=height)  # type: ignore[attr-defined]


def decode(model: SDModel, latents: torch.Tensor, auto_precision: bool = True) -> list:  # type: ignore[type-arg]
    with torch.no_grad():
        return tensor_to_pil(decode_latents(model, latents, auto_precision=auto_precision))


@torch.no_grad()
def sample_batch(
    model: SDModel, request: GenerationRequest, plan: BatchPlan, index: int, cache: TextEncoderCache,
    control: JobControl, width: int, height: int,
) -> tuple[torch.Tensor, str | None]:
    """Phases 2-4 for one batch: conditioning, initial noise, sampling. Returns latents and how it stopped."""
    params = request.sampling
    part = plan.batch(index)
    guidance = guidance_for(
        cache, plan.prompts[part], plan.negative_prompts[part], schedule_steps(request), params.cfg_scale,
        params.s_min_uncond,
    )
    shape = (model.latent_channels, height // model.latent_scale, width // model.latent_scale)
    rng = make_rng(request.seeds, list(plan.seeds[part]), list(plan.subseeds[part]), shape, model.device)
    plan = txt2img_plan(model, params)
    x = run.initial_latent(rng.next(), plan, sgm_noise_multiplier=params.sgm_noise_multiplier)
    cfg = guided_denoiser(model, params.sampler, guidance, vector_conditioning(model, width, height))
    result = run_sampler(params, plan, x, rng, cfg, control, preview_function(model, request.preview_method))
    return result.latents, result.stopped


def txt2img(
    model: SDModel, request: GenerationRequest, control: JobControl, cache: TextEncoderCache | None = None
) -> tuple[list[GeneratedImage], bool]:
    """All batches of a request; returns the images and whether the user interrupted. `cache` carries the
    textual-inversion embeddings, when the caller has them."""
    plan = plan_batches(request)
    cache = cache or TextEncoderCache(model, conditioning_options(request))
    images: list[GeneratedImage] = []
    for index in range(request.n_iter):
        control.begin_pass(index, request.n_iter, request.sampling.steps)
        latents, stopped = sample_batch(model, request, plan, index, cache, control, request.width, request.height)
        part = plan.batch(index)
        for k, picture in enumerate(decode(model, latents, request.auto_vae_precision)):
            i = part.start + k
            images.append(GeneratedImage(picture, plan.seeds[i], plan.subseeds[i], plan.prompts[i], plan.negative_prompts[i]))
        if stopped == "interrupted":
            return images, True
    return images, False
