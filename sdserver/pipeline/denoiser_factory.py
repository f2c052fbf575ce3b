"""The seam between a phase's batch loop and whoever makes the guided denoiser a batch samples with.

A phase (txt2img, img2img, the hires pass) plans, noises, samples, decodes; a `DenoiserFactory` only turns a
`DenoiserSpec` into a `BatchDenoiser`. The default (txt2img.GuidedDenoisers) guides the one model it is handed;
a caller may supply another, e.g. the engine's refiner, whose denoiser moves to a second model mid-sampling.
The phase then previews and decodes with whichever model the denoiser is on (`BatchDenoiser.model()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from sdserver.engine.types import SamplingParams
from sdserver.models.sd_model import SDModel
from sdserver.pipeline.cfg import CFGDenoiser


class GuidedFn(Protocol):
    """A guided denoiser as the samplers call it (CFGDenoiser, or a masked denoiser around one)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: object) -> torch.Tensor: ...


ImageCond = Callable[[SDModel], torch.Tensor | None]  # a model's extra UNet input (inpainting models)
Wrap = Callable[[SDModel, CFGDenoiser], GuidedFn]  # e.g. holding a mask's kept latent, for the given model


def unwrapped(_model: SDModel, cfg: CFGDenoiser) -> GuidedFn:
    return cfg


@dataclass(frozen=True)
class DenoiserSpec:
    """What one batch of a pass needs guided. `image_cond` and `wrap` take the model, as a factory may hand
    the batch to another model part-way."""

    model: SDModel  # the model the pass starts on
    params: SamplingParams  # the pass's own (the hires pass has its sampler and CFG scale)
    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    width: int
    height: int
    steps: int  # the pass's sampling steps
    schedule_steps: int  # the prompt-editing timeline's length (sdserver.pipeline.txt2img.schedule_steps)
    image_cond: ImageCond
    wrap: Wrap = unwrapped
    hires_steps: int | None = None  # the hires pass's denoiser calls; None in a first pass

    @property
    def second_pass(self) -> bool:
        return self.hires_steps is not None


@dataclass(frozen=True)
class BatchDenoiser:
    """`fn` is what the sampler calls; `model()` the model it is on now: previews follow it, the batch's
    latents are decoded by it."""

    fn: GuidedFn
    model: Callable[[], SDModel]


class DenoiserFactory(Protocol):
    def __call__(self, spec: DenoiserSpec) -> BatchDenoiser: ...
