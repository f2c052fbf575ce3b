"""One sampling pass: noise → (schedule, guidance, sampler) → latents, reporting each step to the job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from sdserver.engine.types import Interrupted, JobControl, SamplingParams, SeedParams, Skipped
from sdserver.models.family_sdxl import is_refiner
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.cfg import CFGDenoiser, Guidance, InputMaskedDenoiser, OutputMaskedDenoiser
from sdserver.pipeline.denoiser_factory import GuidedFn
from sdserver.sampling import run
from sdserver.sampling.discrete import DenoiserFn, DiscreteSchedule
from sdserver.sampling.noise import ImageRNG
from sdserver.sampling.registry import get_sampler
from sdserver.sampling.run import SamplingPlan


@dataclass(frozen=True)
class PassResult:
    latents: torch.Tensor
    stopped: str | None = None  # None, "interrupted" or "skipped"


def model_denoiser(model: SDModel, sampler_id: str) -> DenoiserFn:
    def unet(x: torch.Tensor, t: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return model.apply_unet(x, t, extra["context"], extra.get("y"), extra.get("concat"))

    return run.make_denoiser(sampler_id, unet, DiscreteSchedule(model.alphas_cumprod), model.prediction_type)


def make_rng(
    seeds: SeedParams, image_seeds: list[int], image_subseeds: list[int], shape: tuple[int, int, int], device: torch.device
) -> ImageRNG:
    return ImageRNG(
        shape, image_seeds, image_subseeds, seeds.subseed_strength,
        seeds.seed_resize_from_h, seeds.seed_resize_from_w, str(seeds.noise_source), device,
        ensd=seeds.eta_noise_seed_delta,
    )


def run_sampler(
    params: SamplingParams,
    plan: SamplingPlan,
    x: torch.Tensor,
    rng: ImageRNG,
    cfg: GuidedFn,
    control: JobControl,
    preview: Callable[[torch.Tensor], Image.Image],
    *,
    on_denoised: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PassResult:
    """Run the sampler; stop early (keeping the last denoised latent) when the job is interrupted or skipped."""
    last = {"denoised": x}

    def callback(info: dict) -> None:
        denoised = info["denoised"]
        if on_denoised is not None:
            denoised = on_denoised(denoised)
        last["denoised"] = denoised
        step = int(info["i"])  # 0-based index of the step just finished
        control.step(step, (lambda: preview(denoised[0])) if control.wants_preview(step) else None)

    try:
        samples = run.sample(
            plan, cfg, x, rng=rng, eta=params.eta, eta_ancestral=params.eta_ancestral,
            eta_ddim=params.eta_ddim, s_churn=params.s_churn, s_tmin=params.s_tmin, s_tmax=params.s_tmax,
            s_noise=params.s_noise, callback=callback,
        )
    except Interrupted:
        return PassResult(last["denoised"], "interrupted")
    except Skipped:
        return PassResult(last["denoised"], "skipped")
    return PassResult(samples)


def schedule_family(model: SDModel) -> str:
    # The SDXL refiner is an SDXL model for schedules (Align Your Steps), as A1111's is_sdxl says.
    return "sdxl" if is_refiner(model.spec) else model.family


def txt2img_plan(model: SDModel, params: SamplingParams) -> SamplingPlan:
    return run.plan_txt2img(
        params.sampler, params.scheduler, params.steps, DiscreteSchedule(model.alphas_cumprod),
        sigma_min=params.sigma_min, sigma_max=params.sigma_max, rho=params.rho,
        always_discard_next_to_last_sigma=params.always_discard_next_to_last_sigma, family=schedule_family(model),
    )


def img2img_plan(model: SDModel, params: SamplingParams, strength: float, fix_steps: bool) -> SamplingPlan:
    return run.plan_img2img(
        params.sampler, params.scheduler, params.steps, strength, DiscreteSchedule(model.alphas_cumprod),
        fix_steps=fix_steps, sigma_min=params.sigma_min, sigma_max=params.sigma_max, rho=params.rho,
        always_discard_next_to_last_sigma=params.always_discard_next_to_last_sigma, family=schedule_family(model),
    )


def guided_denoiser(model: SDModel, sampler_id: str, guidance: Guidance, vector_cond=None) -> CFGDenoiser:  # type: ignore[no-untyped-def]
    skip_level = run.uncond_skip_level(sampler_id, DiscreteSchedule(model.alphas_cumprod))
    return CFGDenoiser(model_denoiser(model, sampler_id), guidance, vector_cond, skip_level)


def masked_denoiser(
    denoiser: CFGDenoiser, sampler_id: str, init: torch.Tensor, keep: torch.Tensor, regen: torch.Tensor
) -> InputMaskedDenoiser | OutputMaskedDenoiser:
    """Inpainting with a non-inpainting model: hold the latent where `keep` is 1 (A1111's `mask`), regenerate
    where `regen` is 1. Like A1111 1.10, the timestep samplers blend the latent the UNet sees (before the
    denoiser), the k-diffusion samplers blend the denoised value (after)."""
    if get_sampler(sampler_id).kind == "timestep":
        return InputMaskedDenoiser(denoiser, init, keep, regen)
    return OutputMaskedDenoiser(denoiser, init, keep, regen)


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


def txt2img_image_conditioning(model: SDModel, count: int, width: int, height: int) -> torch.Tensor | None:
    """What an inpainting model is given in txt2img (A1111's txt2img_image_conditioning): everything masked
    over a mid-grey image (0 in [-1, 1]). Other models take nothing."""
    if not model.is_inpainting:
        return None
    latent_hw = (height // model.latent_scale, width // model.latent_scale)
    return inpainting_conditioning(model, torch.zeros(count, 3, height, width), None, 1.0, latent_hw)
