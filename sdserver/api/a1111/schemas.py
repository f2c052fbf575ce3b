"""Pydantic models of A1111 1.10's HTTP API (`modules/api/models.py`), written by hand.

Requests are lenient as A1111's pydantic-1 models were: unknown keys are ignored, strings coerce to numbers and
booleans, numbers coerce to strings (an int `sampler_index`), every field has A1111's API default so `{}` is a
valid body, and an explicit `null` means "the default" (clients send ~50 keys with nulls).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_LENIENT = ConfigDict(extra="ignore", coerce_numbers_to_str=True, populate_by_name=True)


class A1111Model(BaseModel):
    model_config = _LENIENT

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # A null for a field whose default is not null falls back to the default (A1111 would 422 on some).
        if not isinstance(data, dict):
            return data
        return {
            k: v
            for k, v in data.items()
            if not (v is None and k in cls.model_fields and cls.model_fields[k].default is not None)
        }


def _lenient_seed(value: Any) -> Any:
    """A1111's get_fixed_seed: null, "" and non-numeric strings mean -1 (random)."""
    if value is None or isinstance(value, bool):
        return -1
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return int(float(text))
            except ValueError:
                return -1
    if isinstance(value, float):
        return int(value)
    return value


class GenerationRequestBase(A1111Model):
    """Fields of A1111's StableDiffusionProcessing plus the API-only fields appended to it."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None
    # SD.Next's field; A1111 has none (it uses override_settings.CLIP_stop_at_last_layers). A harmless superset.
    clip_skip: int | None = None

    @field_validator("seed", "subseed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        return _lenient_seed(value)

    @field_validator("styles", mode="before")
    @classmethod
    def _styles(cls, value: Any) -> Any:
        # A single style name is a list of one; A1111's pydantic 1 accepted that too.
        return [value] if isinstance(value, str) else value


class Txt2ImgRequest(GenerationRequestBase):
    """`POST /sdapi/v1/txt2img` (A1111's StableDiffusionTxt2ImgProcessingAPI)."""

    denoising_strength: float | None = None  # A1111's txt2img default: used only with enable_hr
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None  # Forge's hires CFG scale; null: the first pass's


class Img2ImgRequest(GenerationRequestBase):
    """`POST /sdapi/v1/img2img` (A1111's StableDiffusionImg2ImgProcessingAPI); defaults are the API's, not the UI's."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    """`{images, parameters, info}`: images are raw base64 (no data: prefix); info is a JSON string."""

    images: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    info: str = ""


TextToImageResponse = GenerationResponse
ImageToImageResponse = GenerationResponse


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressRequest(A1111Model):
    skip_current_image: bool = False


class ProgressResponse(BaseModel):
    progress: float = 0.0
    eta_relative: float = 0.0
    state: ProgressState = Field(default_factory=ProgressState)
    current_image: str | None = None
    textinfo: str | None = None


class InternalProgressRequest(A1111Model):
    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


class InternalProgressResponse(BaseModel):
    active: bool = False
    queued: bool = False
    completed: bool = False
    progress: float | None = None
    eta: float | None = None
    live_preview: str | None = None
    id_live_preview: int | None = None
    textinfo: str | None = None


class PendingTasksResponse(BaseModel):
    size: int = 0
    tasks: list[str] = Field(default_factory=list)


class ExtrasBaseRequest(A1111Model):
    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = ""
    image: str | None = None


class FileData(A1111Model):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 (A1111's spelling)


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = ""
    images: list[str] = Field(default_factory=list)


class PngInfoRequest(A1111Model):
    image: str = ""


class PngInfoResponse(BaseModel):
    info: str = ""
    items: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)


class InterrogateRequest(A1111Model):
    image: str = ""
    model: str = "clip"


class InterrogateResponse(BaseModel):
    caption: str | None = None


class InterruptResponse(BaseModel):
    """A1111 answers `{}` to /interrupt, /unload-checkpoint and /reload-checkpoint."""


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1.0
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscaleModeItem(BaseModel):
    name: str


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class SDModuleItem(BaseModel):
    """Forge's /sd-modules item (VAE and text encoders)."""

    model_name: str
    filename: str


class HypernetworkItem(BaseModel):
    name: str
    path: str | None = None


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None = None


class RealesrganItem(BaseModel):
    name: str
    path: str | None = None
    scale: int | None = None


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem] = Field(default_factory=dict)
    skipped: dict[str, EmbeddingItem] = Field(default_factory=dict)


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class ScriptArg(BaseModel):
    label: str | None = None
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


class ScriptInfo(BaseModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[ScriptArg] = Field(default_factory=list)


class ExtensionItem(BaseModel):
    name: str
    remote: str
    branch: str
    commit_hash: str
    version: str
    commit_date: int
    enabled: bool


class MemoryResponse(BaseModel):
    ram: dict[str, Any] = Field(default_factory=dict)
    cuda: dict[str, Any] = Field(default_factory=dict)
