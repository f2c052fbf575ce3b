"""A1111's refiner: sampling moves to a second checkpoint part-way and goes on with the same sigmas, noise and
step count, on conditioning the second model computes for itself (A1111 1.10 `sd_samplers_common.apply_refiner`).

Switch rule (A1111's default): at each denoiser call the noise level is mapped to the current model's nearest
training timestep t, and the switch happens at the first call where (999 - t) / 1000 >= switch_at. With
`by_sampling_steps` (A1111's refiner_switch_by_sample_steps) the fraction is denoiser calls so far over the
pass's calls (its steps, doubled for second-order samplers). switch_at None switches at the first call; a
refiner that is the model already loaded never switches. The prompt schedule keeps counting across the switch.

SDXL refiner models (any job whose model is one, switched to or not) take a vector of pooled text, size, crop
and an aesthetic score: 6.0 for prompts, 2.5 for negative prompts by default; an all-empty negative prompt
batch is encoded as zeros (sgm's force_zero_embeddings, as A1111 asks for it).

Every batch starts on the base model, as A1111 reloads it per batch; the refiner is loaded once, at the first
switch, and kept for the job's later batches. Images are decoded by the model sampling ended on. With the hires
fix, A1111's hires_fix_refiner_pass ("second pass" by default) says in which pass(es) the switch may happen; a
hires pass starts on the model its first pass ended on. The batch loops are sdserver.pipeline's txt2img,
img2img and hires phases; RefinerDenoisers is the DenoiserFactory that gives them the switching denoiser.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

import torch

from sdserver.engine.types import (
    HIRES_FIRST_PASS, HIRES_SECOND_PASS, CheckpointInfo, GeneratedImage, GenerationRequest, JobControl,
    RefinerParams, RefinerUse, SamplingParams,
)
from sdserver.errors import InvalidRequest, ModelNotFound, UnsupportedFeature
from sdserver.models.family_sdxl import is_refiner, refiner_vector
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.cfg import CFGDenoiser, Guidance
from sdserver.pipeline.conditioning import TextEncoderCache, is_empty_prompt, map_text_conditioning, zeroed
from sdserver.pipeline.denoise import guided_denoiser, txt2img_image_conditioning
from sdserver.pipeline.denoiser_factory import BatchDenoiser, DenoiserSpec, GuidedFn, ImageCond, Wrap
from sdserver.pipeline.hires import PixelUpscale, txt2img_hires
from sdserver.pipeline.img2img import img2img
from sdserver.pipeline.txt2img import guidance_for, schedule_steps, txt2img, vector_conditioning
from sdserver.sampling.discrete import DiscreteSchedule
from sdserver.sampling.registry import SAMPLERS

__all__ = [
    "Checkpoints", "GuidedFn", "ModelSlot", "RefinerDenoisers", "RefinerJob", "SwitchRule",
    "SwitchingDenoiser", "completed_ratio", "model_denoiser", "refined_hires", "refined_img2img", "refined_txt2img",
    "refiner_guidance", "refiner_job", "refiner_route", "refiner_use", "resolve_refiner",
    "txt2img_image_conditioning",  # re-exported: it lived here before the pipeline needed it
]

# A1111 names a disabled refiner these ways; sdserver also takes the hires field's "Use same checkpoint".
_LAST_TIMESTEP = 999  # A1111's completed ratio is (999 - t) / 1000


@dataclass(frozen=True)
class ModelSlot:
    """A model with its per-request text-encoder cache."""

    model: SDModel
    cache: TextEncoderCache


@dataclass(frozen=True)
class SwitchRule:
    switch_at: float | None
    by_sampling_steps: bool
    total_calls: int  # the pass's denoiser calls, for by_sampling_steps

    def reached(self, sigma: torch.Tensor, calls: int, model_sigmas: torch.Tensor) -> bool:
        if self.switch_at is None:
            return True
        return completed_ratio(sigma, calls, self.total_calls, model_sigmas, self.by_sampling_steps) >= self.switch_at


def completed_ratio(
    sigma: torch.Tensor, calls: int, total_calls: int, model_sigmas: torch.Tensor, by_sampling_steps: bool
) -> float:
    """How much of the pass A1111 considers done at a denoiser call (see the module docstring)."""
    if by_sampling_steps:
        return calls / max(total_calls, 1)
    timestep = int(torch.argmin((model_sigmas - sigma.detach().float().max().cpu()).abs()))
    return (_LAST_TIMESTEP - timestep) / 1000


class SwitchingDenoiser:
    """Delegates to the base's guided denoiser until the rule is reached, then to the one `switch(calls)`
    builds for the refiner (once). `model` is the model in use; `switched_at` the call index of the switch."""

    def __init__(
        self, first: GuidedFn, model: SDModel, rule: SwitchRule | None,
        switch: Callable[[int], tuple[SDModel, GuidedFn]],
    ) -> None:
        self.current, self.model, self.rule, self.switch = first, model, rule, switch
        self.calls = 0
        self.switched_at: int | None = None

    def _advance(self, sigma: torch.Tensor) -> None:
        if self.switched_at is None and self.rule is not None:
            table = DiscreteSchedule(self.model.alphas_cumprod).sigmas
            if self.rule.reached(sigma, self.calls, table):
                self.model, self.current = self.switch(self.calls)
                self.switched_at = self.calls
        self.calls += 1

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: object) -> torch.Tensor:
        self._advance(sigma)
        return self.current(x, sigma, **extra)

    def denoise_with_uncond(self, x, sigma, *, cond_scale_multiplier=1.0, **extra):  # type: ignore[no-untyped-def]
        self._advance(sigma)
        return self.current.denoise_with_uncond(  # type: ignore[attr-defined]
            x, sigma, cond_scale_multiplier=cond_scale_multiplier, **extra
        )


# ---- conditioning per model ---------------------------------------------------------------------------------


def refiner_guidance(
    guidance: Guidance, negatives: tuple[str, ...], width: int, height: int, score: float, negative_score: float
) -> Guidance:
    """`guidance` with each pooled embedding replaced by the refiner's whole vector `y` (it differs between
    prompt and negative prompt, so it is fixed here rather than per UNet call)."""

    def vector(value: float) -> Callable:  # type: ignore[type-arg]
        def apply(entry):  # type: ignore[no-untyped-def]
            return replace(entry, pooled=refiner_vector(entry.pooled, width, height, value))
        return apply

    force_zero = all(is_empty_prompt(n) for n in negatives)
    unconds = tuple(
        map_text_conditioning(map_text_conditioning(u, zeroed) if force_zero else u, vector(negative_score))
        for u in guidance.unconds
    )
    conds = tuple(map_text_conditioning(c, vector(score)) for c in guidance.conds)
    return replace(guidance, conds=conds, unconds=unconds)


def model_denoiser(
    slot: ModelSlot, request: GenerationRequest, prompts: tuple[str, ...], negatives: tuple[str, ...],
    width: int, height: int, image_cond: torch.Tensor | None, params: SamplingParams | None = None,
    hires_steps: int | None = None,
) -> CFGDenoiser:
    """The guided denoiser of one model for one batch of a pass, with that model's own conditioning. `params`
    and `hires_steps` are the hires pass's (None: the request's first pass)."""
    params = params or request.sampling
    guidance = guidance_for(
        slot.cache, prompts, negatives, schedule_steps(request), params.cfg_scale, params.s_min_uncond, image_cond,
        hires_steps=hires_steps,
    )
    if is_refiner(slot.model.spec):
        guidance = refiner_guidance(
            guidance, negatives, width, height, request.aesthetic_score, request.negative_aesthetic_score
        )
        return guided_denoiser(slot.model, params.sampler, guidance, lambda y: y)
    return guided_denoiser(slot.model, params.sampler, guidance, vector_conditioning(slot.model, width, height))


# ---- the job ------------------------------------------------------------------------------------------------


@dataclass
class RefinerJob:
    """One request's base slot and, loaded on first use by `load`, its refiner slot."""

    base: ModelSlot
    params: RefinerParams | None
    load: Callable[[], ModelSlot] | None
    refiner: ModelSlot | None = None
    refiner_info: CheckpointInfo | None = None  # as loaded (hashed by then)
    used: bool = False

    def use(self, hires: bool = False) -> RefinerUse | None:
        """What the infotext reports: the refiner, when sampling switched to it."""
        if not self.used or self.refiner_info is None or self.params is None:
            return None
        return refiner_use(self.refiner_info, self.params, hires)

    def refiner_slot(self) -> ModelSlot:
        if self.refiner is None:
            assert self.load is not None
            self.refiner = self.load()
        self.used = True
        return self.refiner

    def rule(self, params: SamplingParams, steps: int) -> SwitchRule | None:
        if self.params is None or self.load is None:
            return None
        calls = steps * (2 if SAMPLERS[params.sampler].second_order else 1)
        return SwitchRule(self.params.switch_at, self.params.by_sampling_steps, calls)

    def denoiser(
        self, request: GenerationRequest, prompts: tuple[str, ...], negatives: tuple[str, ...], width: int,
        height: int, steps: int, image_cond_for: ImageCond, wrap: Wrap, *, start: ModelSlot | None = None,
        allow_switch: bool = True, params: SamplingParams | None = None, hires_steps: int | None = None,
    ) -> SwitchingDenoiser:
        """A pass's denoiser starting on `start` (default the base); it may switch to the refiner when
        `allow_switch` and it does not start there already."""
        slot = start or self.base

        def build(on: ModelSlot) -> CFGDenoiser:
            cond = image_cond_for(on.model)
            return model_denoiser(on, request, prompts, negatives, width, height, cond, params, hires_steps)

        def switch(calls: int) -> tuple[SDModel, GuidedFn]:
            on = self.refiner_slot()
            cfg = build(on)
            cfg.step = calls  # the prompt schedule goes on where the base left it
            return on.model, wrap(on.model, cfg)

        on_refiner = self.refiner is not None and slot is self.refiner
        rule = self.rule(params or request.sampling, steps) if allow_switch and not on_refiner else None
        return SwitchingDenoiser(wrap(slot.model, build(slot)), slot.model, rule, switch)


@dataclass(frozen=True)
class RefinerDenoisers:
    """The pipeline's DenoiserFactory for a refiner job: a batch's denoiser starts on the model the pipeline
    hands it (the base, or in a hires pass the refiner if the first pass ended there) and may switch. With
    `hires`, A1111's hires_fix_refiner_pass says in which pass it may."""

    job: RefinerJob
    request: GenerationRequest
    hires: bool = False

    def __call__(self, spec: DenoiserSpec) -> BatchDenoiser:
        job = self.job
        start = job.refiner if job.refiner is not None and spec.model is job.refiner.model else job.base
        denoiser = job.denoiser(
            self.request, spec.prompts, spec.negatives, spec.width, spec.height, spec.steps, spec.image_cond,
            spec.wrap, start=start, allow_switch=self.may_switch(spec.second_pass), params=spec.params,
            hires_steps=spec.hires_steps,
        )
        return BatchDenoiser(denoiser, lambda: denoiser.model)

    def may_switch(self, second_pass: bool) -> bool:
        if not self.hires:
            return True
        which = self.job.params.hires_pass if self.job.params is not None else HIRES_SECOND_PASS
        return which != (HIRES_FIRST_PASS if second_pass else HIRES_SECOND_PASS)


def refined_txt2img(job: RefinerJob, request: GenerationRequest, control: JobControl) -> tuple[list[GeneratedImage], bool]:
    """txt2img's batches through `job`; each image is decoded by the model its sampling ended on."""
    return txt2img(job.base.model, request, control, denoiser_factory=RefinerDenoisers(job, request))


def refined_hires(
    job: RefinerJob, request: GenerationRequest, control: JobControl, pixel_upscale: PixelUpscale
) -> tuple[list[GeneratedImage], bool]:
    """The hires fix through `job`; a second pass starts on whichever model the first ended on."""
    factory = RefinerDenoisers(job, request, hires=True)
    return txt2img_hires(job.base.model, request, control, pixel_upscale, denoiser_factory=factory)


def refined_img2img(
    job: RefinerJob, request: GenerationRequest, control: JobControl, inpainting_mask_weight: float = 1.0
) -> tuple[list[GeneratedImage], bool]:
    """img2img and inpainting batches through `job`."""
    return img2img(
        job.base.model, request, control, inpainting_mask_weight=inpainting_mask_weight,
        denoiser_factory=RefinerDenoisers(job, request),
    )


# ---- engine glue ----------------------------------------------------------------------------------------------


class Checkpoints(Protocol):
    """The part of ModelManager a refiner job needs."""

    def resolve(self, name: str) -> CheckpointInfo: ...

    def load(self, name_or_info: str | CheckpointInfo) -> SDModel: ...

    @property
    def current_info(self) -> CheckpointInfo | None: ...


def resolve_refiner(manager: Checkpoints, request: GenerationRequest) -> CheckpointInfo | None:
    """The refiner checkpoint a request names, None when it names none. An unknown name is a 422 naming
    `refiner_checkpoint`, raised before any model is loaded or sampled."""
    params = request.refiner
    if params is None:  # the A1111 edge turns "None" / "" / "Use same checkpoint" into no refiner
        return None
    try:
        info = manager.resolve(params.checkpoint)
    except ModelNotFound:
        raise InvalidRequest(
            f"Could not find checkpoint with name {params.checkpoint}", field="refiner_checkpoint"
        ) from None
    if request.hires is not None and request.hires.checkpoint is not None:
        raise UnsupportedFeature(
            "hr_checkpoint_name: a hires checkpoint together with a refiner is not supported yet",
            field="hr_checkpoint_name",
        )
    return info


def refiner_route(model: SDModel, base: CheckpointInfo, refiner: CheckpointInfo | None,
                  request: GenerationRequest) -> tuple[bool, CheckpointInfo | None]:
    """(whether the request runs here, the refiner to switch to). Requests that switch models run here, and so
    do those whose own model the plain pipeline can't drive: an SDXL refiner (its vector differs from the
    base's), and an inpainting model in txt2img (it needs its masked-image channels). A refiner that is the
    loaded model itself never switches, as in A1111."""
    if refiner is not None and refiner.filename == base.filename:
        refiner = None
    if is_refiner(model.spec) and request.hires is not None and request.hires.checkpoint is not None:
        raise UnsupportedFeature("hr_checkpoint_name: a hires checkpoint after an SDXL refiner model is not "
                                 "supported yet", field="hr_checkpoint_name")
    inpainting_txt2img = model.is_inpainting and not request.is_img2img and (
        request.hires is None or request.hires.checkpoint is None
    )
    return refiner is not None or is_refiner(model.spec) or inpainting_txt2img, refiner


def refiner_use(info: CheckpointInfo, params: RefinerParams, hires: bool = False) -> RefinerUse:
    # A1111 notes the hires pass option only when it isn't its default.
    hires_pass = params.hires_pass if hires and params.hires_pass != HIRES_SECOND_PASS else None
    return RefinerUse(Path(info.filename).stem, info.hash, params.switch_at, params.by_sampling_steps, hires_pass)


@contextlib.contextmanager
def refiner_job(
    manager: Checkpoints, base: ModelSlot, base_info: CheckpointInfo, refiner: CheckpointInfo | None,
    params: RefinerParams | None, make_cache: Callable[[SDModel], TextEncoderCache],
    enter_model: Callable[[SDModel], ContextManager[object]],
) -> Iterator[RefinerJob]:
    """A RefinerJob whose refiner is loaded through `manager` at the first switch (and `enter_model`ed: tiling);
    afterwards the base checkpoint is the current one again, whatever happened."""
    with contextlib.ExitStack() as stack:

        def load() -> ModelSlot:
            assert refiner is not None
            model = manager.load(refiner)
            job.refiner_info = manager.current_info or refiner
            stack.enter_context(enter_model(model))
            return ModelSlot(model, make_cache(model))

        job = RefinerJob(base, params, load if refiner is not None else None)
        try:
            yield job
        finally:
            stack.close()
            current = manager.current_info
            if job.refiner is not None and (current is None or current.filename != base_info.filename):
                job.refiner = None  # the refiner may be freed while the base comes back
                manager.load(base_info)
