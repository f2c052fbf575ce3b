"""Internal request, result and job-control types shared by the jobs, engine and pipeline layers.

These are the project's own spellings; A1111 names live only in `sdserver.api.a1111`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from PIL import Image


class NoiseSource(enum.StrEnum):
    CPU = "cpu"  # torch CPU generator: portable, A1111's "CPU"
    GPU = "gpu"  # the compute device's own generator: A1111's "GPU"
    NV = "nv"  # Philox4x32 reproduction of CUDA torch.randn on any device: A1111's "NV"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `sampler` and `scheduler` are internal ids (see sdserver.sampling.registry)."""

    sampler: str = "euler"
    scheduler: str = "automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    eta: float | None = None  # None: the sampler's option default (eta_ancestral / eta_ddim)
    eta_ancestral: float = 1.0  # A1111 option defaults, used when eta is None
    eta_ddim: float = 0.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # 0 means infinity, as A1111
    s_noise: float = 1.0
    s_min_uncond: float = 0.0
    sigma_min: float = 0.0  # 0: the model's own
    sigma_max: float = 0.0
    rho: float = 0.0
    always_discard_next_to_last_sigma: bool = False
    sgm_noise_multiplier: bool = False


@dataclass(frozen=True)
class SeedParams:
    seed: int  # resolved, never -1
    subseed: int = 0
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0  # <= 0 disables
    seed_resize_from_h: int = 0
    noise_source: NoiseSource = NoiseSource.CPU
    eta_noise_seed_delta: int = 0


@dataclass(frozen=True)
class HiresParams:
    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    second_pass_steps: int = 0
    sampler: str | None = None
    scheduler: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    checkpoint: str | None = None
    denoising_strength: float = 0.7
    cfg_scale: float | None = None


@dataclass(frozen=True)
class InpaintParams:
    mask: Image.Image
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    invert: bool = False
    fill: int = 1  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    full_res: bool = False
    full_res_padding: int = 32
    mask_round: bool = True


HIRES_FIRST_PASS, HIRES_SECOND_PASS, HIRES_BOTH_PASSES = "first pass", "second pass", "both passes"


@dataclass(frozen=True)
class RefinerParams:
    """Sampling moves to another checkpoint part-way (A1111's refiner)."""

    checkpoint: str
    # Fraction of the schedule done at which to switch; None switches at the first step, as A1111 does.
    switch_at: float | None = 0.8
    # Count denoiser calls instead of reading the noise level (A1111's refiner_switch_by_sample_steps).
    by_sampling_steps: bool = False
    # With the hires fix, the pass(es) the switch may happen in (A1111's hires_fix_refiner_pass).
    hires_pass: str = HIRES_SECOND_PASS


@dataclass(frozen=True)
class RefinerUse:
    """The refiner a job switched to, for the infotext: file name without folder or extension, short hash."""

    name: str
    hash: str | None
    switch_at: float | None
    by_sampling_steps: bool = False
    hires_pass: str | None = None  # set when a hires job switched under a non-default hires_pass


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img or img2img request, fully resolved (defaults applied, names validated)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seeds: SeedParams = field(default_factory=lambda: SeedParams(seed=0))
    clip_skip: int = 1
    tiling: bool = False
    checkpoint: str | None = None  # None: the current model
    vae: str | None = None  # None: the current choice
    emphasis: str = "Original"
    hires: HiresParams | None = None
    # img2img
    init_images: tuple[Image.Image, ...] = ()
    denoising_strength: float = 0.75
    resize_mode: int = 0
    inpaint: InpaintParams | None = None
    initial_noise_multiplier: float = 1.0
    inpainting_mask_weight: float = 1.0
    auto_vae_precision: bool = True  # redo a NaN half-precision decode in float32
    img2img_fix_steps: bool = False
    disable_extra_networks: bool = False
    preview_method: str = "Approx cheap"  # or "Full": a VAE decode of the current latent
    refiner: RefinerParams | None = None
    # SDXL refiner conditioning (A1111's sdxl_refiner_high/low_aesthetic_score): prompt and negative prompt.
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    subseed: int
    prompt: str
    negative_prompt: str


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    model_name: str
    model_hash: str | None
    vae_name: str | None = None
    vae_hash: str | None = None
    # (name as written in the prompt, short hash) of the LoRA-family networks and embeddings used, in order.
    network_hashes: tuple[tuple[str, str], ...] = ()
    embedding_hashes: tuple[tuple[str, str], ...] = ()
    # Further facts the edge may put into its infotext, in insertion order.
    extra_params: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    is_using_inpainting_conditioning: bool = False
    refiner: RefinerUse | None = None  # None: no switch happened


class Interrupted(Exception):
    """Raised inside a job when the user interrupted it; the pipeline returns what it has."""


class Skipped(Exception):
    """Raised inside a job when the user skipped the current batch; the pipeline moves to the next one."""


class JobControl(Protocol):
    """What the engine reports to, and asks, the job that runs it. Implemented by the jobs layer.

    `step` is called once per sampler step with the 0-based index of the step just finished; it raises
    Interrupted or Skipped when the user asked for that.
    `preview` is a zero-argument function that decodes the current latent when called, so previews cost
    nothing unless someone looks.
    """

    def begin_pass(self, batch_index: int, batch_count: int, steps: int) -> None: ...

    def step(self, step: int, preview: Callable[[], Image.Image] | None) -> None: ...

    def wants_preview(self, step: int) -> bool: ...


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint file the server can load (A1111's identity rules: see sdserver.models.catalog)."""

    title: str  # "name.safetensors [shorthash]", or just the name when unhashed
    model_name: str  # relative path without extension, "/" replaced by "_"
    name: str  # relative path with extension, as A1111's `name`
    filename: str  # absolute path
    hash: str | None = None  # first 10 hex digits of sha256
    sha256: str | None = None
    config: str | None = None  # a .yaml beside the file


class Engine(Protocol):
    """What the jobs layer drives. Every method runs on the worker thread that owns the device."""

    def generate(self, request: GenerationRequest, control: JobControl) -> GenerationResult: ...

    def checkpoints(self) -> list[CheckpointInfo]: ...

    def refresh_checkpoints(self) -> None: ...

    def current_checkpoint(self) -> CheckpointInfo | None: ...

    def load_checkpoint(self, name: str) -> CheckpointInfo:
        """Load by title, name, model_name, short hash or sha256; raises ModelNotFound."""
        ...

    def unload(self) -> None: ...

    def reload(self) -> None: ...

    def default_size(self) -> tuple[int, int]:
        """The loaded model's native (width, height), used when a request gives none."""
        ...

    # Files requests draw on besides checkpoints; safe to call from HTTP threads.
    def upscaler_list(self) -> list[Any]: ...

    def realesrgan_models(self) -> list[Any]: ...

    def lora_list(self) -> list[dict[str, Any]]: ...

    def embedding_listing(self) -> dict[str, dict[str, Any]]: ...

    def vae_list(self) -> list[Any]: ...

    def extras(self, image: Image.Image, params: Any) -> tuple[Image.Image, str]: ...
