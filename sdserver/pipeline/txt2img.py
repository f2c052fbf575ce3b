"""txt2img as numbered phases: prompts and seeds → conditioning → noise → sampling → decoding.

Each phase's batch loop takes an optional `denoiser_factory` (sdserver.pipeline.denoiser_factory): the guided
denoiser a batch samples with and the model that decodes it come from there; the default, GuidedDenoisers,
guides the phase's own model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from sdserver.engine.types import GeneratedImage, GenerationRequest, JobControl, SamplingParams
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.cfg import Guidance
from sdserver.pipeline.conditioning import (
    ConditioningOptions, TextEncoderCache, condition_prompt, is_empty_prompt, map_text_conditioning, zeroed,
)
from sdserver.pipeline.denoise import (
    PassResult, guided_denoiser, make_rng, run_sampler, txt2img_image_conditioning, txt2img_plan,
)
from sdserver.pipeline.denoiser_factory import BatchDenoiser, DenoiserFactory, DenoiserSpec
from sdserver.pipeline.images import decode_latents, preview_function, tensor_to_pil
from sdserver.sampling import run
from sdserver.sampling.noise import ImageRNG
from sdserver.sampling.registry import SAMPLERS
from sdserver.sampling.run import SamplingPlan


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


def generated_images(plan: BatchPlan, index: int, pictures: list[Image.Image]) -> list[GeneratedImage]:
    """Phase 5's output: batch `index`'s pictures with the seeds and prompts that made them."""
    start = plan.batch(index).start
    return [
        GeneratedImage(picture, plan.seeds[i], plan.subseeds[i], plan.prompts[i], plan.negative_prompts[i])
        for i, picture in enumerate(pictures, start)
    ]


@dataclass(frozen=True)
class GuidedDenoisers:
    """The default DenoiserFactory: classifier-free guidance of the spec's model on `cache`'s conditioning."""

    cache: TextEncoderCache

    def __call__(self, spec: DenoiserSpec) -> BatchDenoiser:
        model, params = spec.model, spec.params
        guidance = guidance_for(
            self.cache, spec.prompts, spec.negatives, spec.schedule_steps, params.cfg_scale, params.s_min_uncond,
            spec.image_cond(model), hires_steps=spec.hires_steps,
        )
        cfg = guided_denoiser(model, params.sampler, guidance, vector_conditioning(model, spec.width, spec.height))
        return BatchDenoiser(spec.wrap(model, cfg), lambda: model)


def sample_with(
    batch: BatchDenoiser, params: SamplingParams, plan: SamplingPlan, x: torch.Tensor, rng: ImageRNG,
    control: JobControl, preview_method: str,
) -> PassResult:
    """Phase 4: the sampler over `batch`'s denoiser; previews decode with the model it is on at the time."""

    def preview(latent: torch.Tensor) -> Image.Image:
        return preview_function(batch.model(), preview_method)(latent)

    return run_sampler(params, plan, x, rng, batch.fn, control, preview)


@torch.no_grad()
def sample_batch(
    model: SDModel, request: GenerationRequest, plan: BatchPlan, index: int, factory: DenoiserFactory,
    control: JobControl, width: int, height: int,
) -> tuple[torch.Tensor, str | None, SDModel]:
    """Phases 2-4 for one batch: initial noise, conditioning, sampling. Returns the latents, how sampling
    stopped and the model it ended on."""
    params = request.sampling
    part = plan.batch(index)
    prompts = plan.prompts[part]
    shape = (model.latent_channels, height // model.latent_scale, width // model.latent_scale)
    rng = make_rng(request.seeds, list(plan.seeds[part]), list(plan.subseeds[part]), shape, model.device)
    sampling_plan = txt2img_plan(model, params)
    x = run.initial_latent(rng.next(), sampling_plan, sgm_noise_multiplier=params.sgm_noise_multiplier)
    batch = factory(DenoiserSpec(
        model, params, prompts, plan.negative_prompts[part], width, height, params.steps, schedule_steps(request),
        lambda on: txt2img_image_conditioning(on, len(prompts), width, height),
    ))
    result = sample_with(batch, params, sampling_plan, x, rng, control, request.preview_method)
    return result.latents, result.stopped, batch.model()


def txt2img(
    model: SDModel, request: GenerationRequest, control: JobControl, cache: TextEncoderCache | None = None, *,
    denoiser_factory: DenoiserFactory | None = None,
) -> tuple[list[GeneratedImage], bool]:
    """All batches of a request; returns the images and whether the user interrupted. `cache` carries the
    textual-inversion embeddings, when the caller has them; `denoiser_factory` replaces GuidedDenoisers(cache)."""
    plan = plan_batches(request)
    factory = denoiser_factory or GuidedDenoisers(cache or TextEncoderCache(model, conditioning_options(request)))
    images: list[GeneratedImage] = []
    for index in range(request.n_iter):
        control.begin_pass(index, request.n_iter, request.sampling.steps)
        latents, stopped, ended_on = sample_batch(
            model, request, plan, index, factory, control, request.width, request.height
        )
        images += generated_images(plan, index, decode(ended_on, latents, request.auto_vae_precision))
        if stopped == "interrupted":
            return images, True
    return images, False
