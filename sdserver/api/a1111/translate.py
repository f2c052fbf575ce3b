"""The pure translate pair: A1111 request → internal `GenerationRequest`; internal result → A1111 response.

Nothing here touches the engine, the queue or the network. The route passes the current options, the model's
native size, a random-seed source and an image decoder, and gets back a frozen request (or a typed 422).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence, TypeVar

from PIL import Image

from sdserver.api.a1111 import names
from sdserver.api.a1111.images import encode_image, flatten, grid_rows, image_grid, mask_to_l
from sdserver.api.a1111.infotext import FIXED_KEYS_AFTER, FIXED_KEYS_BEFORE, create_infotext, generation_params
from sdserver.api.a1111.infotext import parse_infotext
from sdserver.api.a1111.options import EMPHASIS_MODES, RANDN_SOURCES, coerce_option
from sdserver.api.a1111.schemas import Img2ImgRequest, Txt2ImgRequest, GenerationRequestBase
from sdserver.api.a1111.styles import PromptStyle
from sdserver.engine.types import (
    HIRES_BOTH_PASSES,
    HIRES_FIRST_PASS,
    HIRES_SECOND_PASS,
    GenerationRequest,
    GenerationResult,
    HiresParams,
    InpaintParams,
    NoiseSource,
    RefinerParams,
    SamplingParams,
    SeedParams,
)
from sdserver.errors import InvalidImage, InvalidRequest, UnsupportedFeature

Decoder = Callable[[str, str], Image.Image]
_Req = TypeVar("_Req", bound=GenerationRequestBase)

# A1111 draws random seeds with random.randrange(4294967294); the route passes an equivalent callable.
SEED_RANGE = 4294967294
# A1111 raises for hires without denoising_strength (a 500); sdserver uses the UI's default instead.
HIRES_DEFAULT_DENOISING = 0.7
_MAX_SEED = 2**64 - 1  # torch generators take seeds up to 2**64-1


@dataclass(frozen=True)
class Limits:
    """Request limits (issue: a server that never falls over). Out-of-range values are a 422 naming the field;
    nothing is silently clamped."""

    max_width: int = 4096
    max_height: int = 4096
    min_size: int = 8  # one latent pixel
    max_pixels: int = 4096 * 4096  # width × height of the final image (hires target included)
    max_steps: int = 150
    min_steps: int = 1
    max_images: int = 64  # batch_size × n_iter
    max_prompt_length: int = 20000  # characters, prompt and negative prompt each
    min_cfg_scale: float = 0.0
    max_cfg_scale: float = 100.0
    max_input_pixels: int = 8192 * 8192  # a decoded input image (decompression bombs)


_NO_STYLES: Mapping[str, PromptStyle] = MappingProxyType({})
_MASKED_CONTENT_RANGE = range(4)
_RESIZE_MODES = range(4)


# ---- small pure helpers -----------------------------------------------------------------------------------


def resolve_seed(value: int | None, random_seed: Callable[[], int], field: str) -> int:
    """-1 (or null) → a fresh random seed; anything else is used as given."""
    if value is None or value == -1:
        return int(random_seed())
    if value < -1 or value > _MAX_SEED:
        raise InvalidRequest(f"{field} must be -1 (random) or between 0 and {_MAX_SEED}; got {value}", field=field)
    return int(value)


def merge_prompt(style_text: str, prompt: str) -> str:
    """A1111's style rule: `{prompt}` in the style is replaced by the prompt; else the style is appended."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(
    prompt: str, negative_prompt: str, style_names: Sequence[str] | None, styles: Mapping[str, PromptStyle]
) -> tuple[str, str]:
    for name in style_names or ():
        style = styles.get(name)
        if style is None:
            available = ", ".join(sorted(styles)) or "none (no styles.csv)"
            raise InvalidRequest(f"Style {name!r} not found; available styles: {available}", field="styles")
        prompt = merge_prompt(style.prompt, prompt)
        negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


_LINE_COMMENT = re.compile(r"(^|\n)#[^\n]*(\n|$)")
_TAIL_COMMENT = re.compile(r"#[^\n]*(\n|$)")


def strip_comments(text: str) -> str:
    """A1111 1.8+ prompt comments: `#` to the end of the line is removed (whole lines first)."""
    text = _LINE_COMMENT.sub("\n", text)
    text = _TAIL_COMMENT.sub("\n", text)
    return text.strip("\n")


def noise_source(value: Any, field: str = "randn_source") -> NoiseSource:
    text = str(value).strip().upper()
    if text not in RANDN_SOURCES:
        raise InvalidRequest(f"{field} must be one of {', '.join(RANDN_SOURCES)}; got {value!r}", field=field)
    return {"CPU": NoiseSource.CPU, "GPU": NoiseSource.GPU, "NV": NoiseSource.NV}[text]


def effective_options(options: Mapping[str, Any], override_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options for one request: the server's values under the request's `override_settings`, type-checked."""
    merged = dict(options)
    for key, value in (override_settings or {}).items():
        try:
            merged[key] = coerce_option(key, value, options.get(key))
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, field=f"override_settings.{key}") from None
    return merged


def planned_seeds(seeds: SeedParams, count: int) -> tuple[list[int], list[int]]:
    """A1111's all_seeds / all_subseeds: seed+i per image, or the same seed for all when variation is on."""
    if seeds.subseed_strength == 0:
        all_seeds = [seeds.seed + i for i in range(count)]
    else:
        all_seeds = [seeds.seed] * count
    return all_seeds, [seeds.subseed + i for i in range(count)]


# ---- validation -------------------------------------------------------------------------------------------


def _check_range(value: float, low: float, high: float, field: str) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"{field} must be between {low} and {high}; got {value}", field=field)


def _check_size(width: int, height: int, limits: Limits, fields: tuple[str, str] = ("width", "height")) -> None:
    _check_range(width, limits.min_size, limits.max_width, fields[0])
    _check_range(height, limits.min_size, limits.max_height, fields[1])
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"{fields[0]}×{fields[1]} = {width * height} pixels is over the limit of {limits.max_pixels}",
            field=fields[0],
        )


def _check_common(req: GenerationRequestBase, limits: Limits) -> None:
    _check_range(req.steps, limits.min_steps, limits.max_steps, "steps")
    _check_range(req.cfg_scale, limits.min_cfg_scale, limits.max_cfg_scale, "cfg_scale")
    _check_range(req.subseed_strength, 0.0, 1.0, "subseed_strength")
    if req.batch_size < 1:
        raise InvalidRequest(f"batch_size must be at least 1; got {req.batch_size}", field="batch_size")
    if req.n_iter < 1:
        raise InvalidRequest(f"n_iter must be at least 1; got {req.n_iter}", field="n_iter")
    if req.batch_size * req.n_iter > limits.max_images:
        raise InvalidRequest(
            f"batch_size × n_iter = {req.batch_size * req.n_iter} images is over the limit of {limits.max_images}",
            field="batch_size",
        )
    for field in ("prompt", "negative_prompt"):
        if len(getattr(req, field)) > limits.max_prompt_length:
            raise InvalidRequest(f"{field} is longer than {limits.max_prompt_length} characters", field=field)
    if req.clip_skip is not None:
        _check_range(req.clip_skip, 1, 12, "clip_skip")


def _check_scripts(req: GenerationRequestBase) -> None:
    if req.script_name:
        raise InvalidRequest(f"Script '{req.script_name}' not found", field="script_name")
    for name, entry in (req.alwayson_scripts or {}).items():
        # Some clients always send e.g. {"ControlNet": {"args": []}}: an entry that asks for nothing is harmless.
        args = entry.get("args") if isinstance(entry, dict) else entry
        if args:
            raise InvalidRequest(f"always on script {name} not found", field=f"alwayson_scripts.{name}")


def _check_unsupported(req: GenerationRequestBase) -> None:
    if req.restore_faces:
        raise UnsupportedFeature("restore_faces: face restoration is not available in sdserver", field="restore_faces")


# ---- infotext in the request (A1111 1.8+) -----------------------------------------------------------------

# infotext key → request field; filled only where the request did not set the field itself.
_INFOTEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("Prompt", "prompt"),
    ("Negative prompt", "negative_prompt"),
    ("Steps", "steps"),
    ("Sampler", "sampler_name"),
    ("Schedule type", "scheduler"),
    ("CFG scale", "cfg_scale"),
    ("Seed", "seed"),
    ("Size-1", "width"),
    ("Size-2", "height"),
    ("Variation seed", "subseed"),
    ("Variation seed strength", "subseed_strength"),
    ("Seed resize from-1", "seed_resize_from_w"),
    ("Seed resize from-2", "seed_resize_from_h"),
    ("Denoising strength", "denoising_strength"),
    ("Eta", "eta"),
    ("Hires upscale", "hr_scale"),
    ("Hires steps", "hr_second_pass_steps"),
    ("Hires upscaler", "hr_upscaler"),
    ("Hires resize-1", "hr_resize_x"),
    ("Hires resize-2", "hr_resize_y"),
    ("Hires sampler", "hr_sampler_name"),
    ("Hires schedule type", "hr_scheduler"),
    ("Hires prompt", "hr_prompt"),
    ("Hires negative prompt", "hr_negative_prompt"),
    ("Refiner", "refiner_checkpoint"),
    ("Refiner switch at", "refiner_switch_at"),
)
_INFOTEXT_OPTIONS: tuple[tuple[str, str], ...] = (
    ("Clip skip", "CLIP_stop_at_last_layers"),
    ("RNG", "randn_source"),
    ("ENSD", "eta_noise_seed_delta"),
    ("Emphasis", "emphasis"),
    ("Eta DDIM", "eta_ddim"),
    ("Noise multiplier", "initial_noise_multiplier"),
)


def apply_infotext(req: _Req) -> _Req:
    """A1111's `infotext` request field: values from the infotext fill every field the request left unset."""
    if not req.infotext:
        return req
    parsed = parse_infotext(req.infotext, add_defaults=False)
    fields = type(req).model_fields
    fill = {
        field: parsed[key]
        for key, field in _INFOTEXT_FIELDS
        if key in parsed and field in fields and field not in req.model_fields_set
    }
    if "enable_hr" in fields and "enable_hr" not in req.model_fields_set:
        if "Hires upscale" in parsed or "Hires resize-1" in parsed:
            fill["enable_hr"] = True
    overrides = dict(req.override_settings or {})
    for key, option in _INFOTEXT_OPTIONS:
        if key in parsed:
            overrides.setdefault(option, parsed[key])
    data = {**req.model_dump(exclude_unset=True), **fill}
    if overrides:
        data["override_settings"] = overrides
    return type(req).model_validate(data)


# ---- request translation ----------------------------------------------------------------------------------


def _sampling(req: GenerationRequestBase, opts: Mapping[str, Any]) -> SamplingParams:
    sampler_id, scheduler_id = names.resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)

    def pick(field: str, default: float) -> float:
        value = getattr(req, field)
        return float(value if value is not None else opts.get(field, default))

    return SamplingParams(
        sampler=sampler_id,
        scheduler=scheduler_id,
        steps=int(req.steps),
        cfg_scale=float(req.cfg_scale),
        eta=float(req.eta) if req.eta is not None else None,  # None: the option below that fits the sampler
        eta_ancestral=float(opts.get("eta_ancestral", 1.0)),
        eta_ddim=float(opts.get("eta_ddim", 0.0)),
        s_churn=pick("s_churn", 0.0),
        s_tmin=pick("s_tmin", 0.0),
        s_tmax=pick("s_tmax", 0.0),
        s_noise=pick("s_noise", 1.0),
        s_min_uncond=pick("s_min_uncond", 0.0),
        sigma_min=float(opts.get("sigma_min", 0.0)),
        sigma_max=float(opts.get("sigma_max", 0.0)),
        rho=float(opts.get("rho", 0.0)),
        always_discard_next_to_last_sigma=bool(opts.get("always_discard_next_to_last_sigma", False)),
        sgm_noise_multiplier=bool(opts.get("sgm_noise_multiplier", False)),
    )


def _seeds(req: GenerationRequestBase, opts: Mapping[str, Any], random_seed: Callable[[], int]) -> SeedParams:
    return SeedParams(
        seed=resolve_seed(req.seed, random_seed, "seed"),
        # Resolved even when unused, as A1111 does: info reports it.
        subseed=resolve_seed(req.subseed, random_seed, "subseed"),
        subseed_strength=float(req.subseed_strength),
        seed_resize_from_w=int(req.seed_resize_from_w),
        seed_resize_from_h=int(req.seed_resize_from_h),
        noise_source=noise_source(opts.get("randn_source", "CPU"), "randn_source"),
        eta_noise_seed_delta=int(opts.get("eta_noise_seed_delta", 0) or 0),
    )


def _prompts(req: GenerationRequestBase, opts: Mapping[str, Any], styles: Mapping[str, PromptStyle]) -> tuple[str, str]:
    prompt, negative = apply_styles(req.prompt, req.negative_prompt, req.styles, styles)
    if opts.get("enable_prompt_comments", True):
        prompt, negative = strip_comments(prompt), strip_comments(negative)
    return prompt, negative


def _model_choice(override_settings: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(checkpoint, vae) the request asks for; None: whatever the server has now."""
    override = override_settings or {}
    checkpoint = override.get("sd_model_checkpoint") or None
    vae = override.get("sd_vae")
    vae = None if vae in (None, "", "Automatic") else str(vae)
    return (str(checkpoint) if checkpoint else None), vae


def _clip_skip(req: GenerationRequestBase, opts: Mapping[str, Any]) -> int:
    value = req.clip_skip if req.clip_skip is not None else opts.get("CLIP_stop_at_last_layers", 1)
    try:
        clip_skip = int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"CLIP_stop_at_last_layers must be an integer; got {value!r}",
                             field="override_settings.CLIP_stop_at_last_layers") from None
    _check_range(clip_skip, 1, 12, "clip_skip" if req.clip_skip is not None else "CLIP_stop_at_last_layers")
    return clip_skip


def _emphasis(opts: Mapping[str, Any]) -> str:
    value = str(opts.get("emphasis", "Original"))
    if value not in EMPHASIS_MODES:
        raise InvalidRequest(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}; got {value!r}", field="emphasis")
    return value


# A1111 treats these refiner_checkpoint values as "no refiner"; sdserver also the hires field's wording.
_NO_REFINER = ("", "None", "none", "Use same checkpoint")
_HIRES_REFINER_PASSES = (HIRES_FIRST_PASS, HIRES_SECOND_PASS, HIRES_BOTH_PASSES)


def _refiner(req: GenerationRequestBase, opts: Mapping[str, Any]) -> RefinerParams | None:
    """The refiner switch; the checkpoint name is checked by the engine (a 422 naming refiner_checkpoint)."""
    if req.refiner_checkpoint is None or req.refiner_checkpoint in _NO_REFINER:
        return None
    switch_at = req.refiner_switch_at
    if switch_at is not None:
        _check_range(switch_at, 0.0, 1.0, "refiner_switch_at")
    hires_pass = str(opts.get("hires_fix_refiner_pass", HIRES_SECOND_PASS))
    if hires_pass not in _HIRES_REFINER_PASSES:
        raise InvalidRequest(f"hires_fix_refiner_pass must be one of {', '.join(_HIRES_REFINER_PASSES)}",
                             field="override_settings.hires_fix_refiner_pass")
    return RefinerParams(
        checkpoint=str(req.refiner_checkpoint),
        switch_at=None if switch_at is None else float(switch_at),
        by_sampling_steps=bool(opts.get("refiner_switch_by_sample_steps", False)),
        hires_pass=hires_pass,
    )


def _size(req: GenerationRequestBase, default_size: tuple[int, int]) -> tuple[int, int]:
    # Only an omitted (or null) size takes the model's native one: a client that sends 512 gets 512.
    width = req.width if "width" in req.model_fields_set else default_size[0]
    height = req.height if "height" in req.model_fields_set else default_size[1]
    return int(width), int(height)


def _common(
    req: GenerationRequestBase,
    options: Mapping[str, Any],
    default_size: tuple[int, int],
    random_seed: Callable[[], int],
    styles: Mapping[str, PromptStyle],
    limits: Limits,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """GenerationRequest fields shared by txt2img and img2img, and the request's effective options."""
    _check_scripts(req)
    _check_unsupported(req)
    _check_common(req, limits)
    opts = effective_options(options, req.override_settings)
    prompt, negative = _prompts(req, opts, styles)
    checkpoint, _ = _model_choice(req.override_settings)
    # The server-wide sd_vae option counts too, not just a per-request override.
    vae = opts.get("sd_vae")
    vae = None if vae in (None, "", "Automatic") else str(vae)
    width, height = _size(req, default_size)
    fields = dict(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        batch_size=int(req.batch_size),
        n_iter=int(req.n_iter),
        sampling=_sampling(req, opts),
        seeds=_seeds(req, opts, random_seed),
        clip_skip=_clip_skip(req, opts),
        tiling=bool(req.tiling if req.tiling is not None else opts.get("tiling", False)),
        checkpoint=checkpoint,
        vae=vae,
        emphasis=_emphasis(opts),
        disable_extra_networks=bool(req.disable_extra_networks),
        preview_method="Full" if opts.get("show_progress_type") == "Full" else "Approx cheap",
        refiner=_refiner(req, opts),
        aesthetic_score=float(opts.get("sdxl_refiner_high_aesthetic_score", 6.0)),
        negative_aesthetic_score=float(opts.get("sdxl_refiner_low_aesthetic_score", 2.5)),
    )
    return fields, opts


def _hires(req: Txt2ImgRequest, base: SamplingParams, width: int, height: int, limits: Limits) -> HiresParams:
    denoising = req.denoising_strength if req.denoising_strength is not None else HIRES_DEFAULT_DENOISING
    _check_range(denoising, 0.0, 1.0, "denoising_strength")
    if req.hr_scale <= 0:
        raise InvalidRequest(f"hr_scale must be above 0; got {req.hr_scale}", field="hr_scale")
    if req.hr_second_pass_steps < 0 or req.hr_second_pass_steps > limits.max_steps:
        raise InvalidRequest(f"hr_second_pass_steps must be between 0 and {limits.max_steps}",
                             field="hr_second_pass_steps")
    resize_x, resize_y = int(req.hr_resize_x), int(req.hr_resize_y)
    if resize_x < 0 or resize_y < 0:
        raise InvalidRequest("hr_resize_x and hr_resize_y must not be negative", field="hr_resize_x")
    if resize_x == 0 and resize_y == 0:
        target = (int(width * req.hr_scale), int(height * req.hr_scale))
        fields = ("hr_scale", "hr_scale")
    else:
        target = (resize_x or int(resize_y * width / height), resize_y or int(resize_x * height / width))
        fields = ("hr_resize_x", "hr_resize_y")
    _check_size(*target, limits, fields=fields)
    hr_sampler, hr_scheduler = names.resolve_hr_sampler(
        req.hr_sampler_name, req.hr_scheduler, (base.sampler, base.scheduler)
    )
    checkpoint = req.hr_checkpoint_name
    if checkpoint in ("", "Use same checkpoint"):
        checkpoint = None
    return HiresParams(
        scale=float(req.hr_scale),
        resize_x=resize_x,
        resize_y=resize_y,
        upscaler=req.hr_upscaler or "Latent",
        second_pass_steps=int(req.hr_second_pass_steps),
        sampler=hr_sampler,
        scheduler=hr_scheduler,
        prompt=req.hr_prompt or "",
        negative_prompt=req.hr_negative_prompt or "",
        checkpoint=checkpoint,
        denoising_strength=float(denoising),
        cfg_scale=float(req.hr_cfg) if req.hr_cfg is not None else None,
    )


def txt2img_request(
    req: Txt2ImgRequest,
    options: Mapping[str, Any],
    *,
    default_size: tuple[int, int],
    random_seed: Callable[[], int],
    styles: Mapping[str, PromptStyle] = _NO_STYLES,
    limits: Limits = Limits(),
) -> GenerationRequest:
    """A validated A1111 txt2img body → the internal request (seeds resolved, names mapped, limits checked)."""
    req = apply_infotext(req)
    fields, _opts = _common(req, options, default_size, random_seed, styles, limits)
    width, height = fields["width"], fields["height"]
    hires = None
    if req.enable_hr:
        if req.firstphase_width or req.firstphase_height:
            # Legacy (pre-1.0) meaning: width/height are the final size, firstphase_* the first pass.
            final = (width, height)
            width, height = req.firstphase_width or width, req.firstphase_height or height
            req = req.model_copy(update={"hr_resize_x": final[0], "hr_resize_y": final[1]})
            fields.update(width=width, height=height)
        hires = _hires(req, fields["sampling"], width, height, limits)
    _check_size(width, height, limits)
    return GenerationRequest(**fields, hires=hires)


def _init_images(req: Img2ImgRequest, decode: Decoder, background: str) -> tuple[Image.Image, ...]:
    if not req.init_images:
        raise InvalidImage("Init image not found: init_images needs at least one image", field="init_images")
    return tuple(
        flatten(decode(data, f"init_images[{i}]"), background) for i, data in enumerate(req.init_images)
    )


def _inpaint(req: Img2ImgRequest, decode: Decoder) -> InpaintParams | None:
    if not req.mask:
        return None
    if req.inpainting_fill not in _MASKED_CONTENT_RANGE:
        raise InvalidRequest("inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)",
                             field="inpainting_fill")
    blur_x, blur_y = req.mask_blur_x, req.mask_blur_y
    if req.mask_blur is not None:
        blur_x = blur_y = req.mask_blur  # A1111's mask_blur is a property setting both
    if blur_x < 0 or blur_y < 0:
        raise InvalidRequest("mask blur must not be negative", field="mask_blur")
    if req.inpaint_full_res_padding < 0:
        raise InvalidRequest("inpaint_full_res_padding must not be negative", field="inpaint_full_res_padding")
    return InpaintParams(
        mask=mask_to_l(decode(req.mask, "mask")),
        mask_blur_x=int(blur_x),
        mask_blur_y=int(blur_y),
        invert=bool(req.inpainting_mask_invert),
        fill=int(req.inpainting_fill),
        full_res=bool(req.inpaint_full_res),
        full_res_padding=int(req.inpaint_full_res_padding),
        mask_round=bool(req.mask_round),
    )


def img2img_request(
    req: Img2ImgRequest,
    options: Mapping[str, Any],
    *,
    default_size: tuple[int, int],
    random_seed: Callable[[], int],
    decode: Decoder,
    styles: Mapping[str, PromptStyle] = _NO_STYLES,
    limits: Limits = Limits(),
) -> GenerationRequest:
    """A validated A1111 img2img body → the internal request; `decode(data, field)` turns base64 into an image."""
    req = apply_infotext(req)
    fields, opts = _common(req, options, default_size, random_seed, styles, limits)
    _check_size(fields["width"], fields["height"], limits)
    _check_range(req.denoising_strength, 0.0, 1.0, "denoising_strength")
    if req.resize_mode not in _RESIZE_MODES:
        raise InvalidRequest("resize_mode must be 0, 1, 2 or 3", field="resize_mode")
    images = _init_images(req, decode, str(opts.get("img2img_background_color", "#ffffff")))
    if len(images) > 1:
        # A1111: several init images make the batch; more images than batch_size is an error.
        if len(images) > req.batch_size:
            raise InvalidRequest(
                f"bad number of images passed: {len(images)}; expecting {req.batch_size} or less",
                field="init_images",
            )
        fields["batch_size"] = len(images)
    noise_multiplier = (
        req.initial_noise_multiplier
        if req.initial_noise_multiplier is not None
        else opts.get("initial_noise_multiplier", 1.0)
    )
    return GenerationRequest(
        **fields,
        init_images=images,
        denoising_strength=float(req.denoising_strength),
        resize_mode=int(req.resize_mode),
        inpaint=_inpaint(req, decode),
        initial_noise_multiplier=float(noise_multiplier),
        inpainting_mask_weight=float(opts.get("inpainting_mask_weight", 1.0)),
        auto_vae_precision=bool(opts.get("auto_vae_precision", True)),
        img2img_fix_steps=bool(opts.get("img2img_fix_steps", False)),
    )


# ---- response -------------------------------------------------------------------------------------------

_INFO_FIXED = (set(FIXED_KEYS_BEFORE) | set(FIXED_KEYS_AFTER)) - {"Schedule type", "Denoising strength"}


def _echo_parameters(req: GenerationRequestBase) -> dict[str, Any]:
    """A1111's `parameters`: the request as validated, defaults filled in; seed stays -1."""
    params = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        params["init_images"] = None
        params["mask"] = None
    return params


def _wants_grid(req: GenerationRequestBase, opts: Mapping[str, Any], count: int) -> bool:
    minimum = 2 if opts.get("grid_only_if_multiple", True) else 1
    return bool(req.save_images and opts.get("return_grid", True) and count >= minimum)


def _denoising_for_info(req: GenerationRequestBase, gen: GenerationRequest) -> float | None:
    if gen.is_img2img:
        return gen.denoising_strength
    if gen.hires is not None:
        return gen.hires.denoising_strength
    return getattr(req, "denoising_strength", None)


def generation_response(
    req: GenerationRequestBase,
    gen: GenerationRequest,
    result: GenerationResult,
    options: Mapping[str, Any],
    *,
    job_timestamp: str,
    version: str,
    save: Callable[[list[Any], list[str], bool, Mapping[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """`{images, parameters, info}` as A1111 returns it; `info` is a JSON string with A1111's full key set.
    With `save_images`, `save(pictures, infotexts, grid_first, options)` writes them out."""
    opts = effective_options(options, req.override_settings)
    count = gen.image_count
    all_seeds, all_subseeds = planned_seeds(gen.seeds, count)
    infotexts: list[str] = []
    first_params: dict[str, Any] | None = None
    for image in result.images:
        params = generation_params(gen, result, opts, seed=image.seed, subseed=image.subseed, version=version)
        first_params = first_params or params
        infotexts.append(create_infotext(image.prompt, image.negative_prompt, params))
    if first_params is None or first_params["Seed"] != all_seeds[0]:
        first_params = generation_params(gen, result, opts, seed=all_seeds[0], subseed=all_subseeds[0],
                                         version=version)

    pictures = [image.image for image in result.images]
    index_of_first_image = 0
    if _wants_grid(req, opts, len(pictures)):
        # A1111 prepends a grid when the request saves images and `return_grid` is on; its infotext is the
        # job's main one (first seed).
        rows = grid_rows(len(pictures), gen.batch_size, int(opts.get("n_rows", -1)),
                         bool(opts.get("grid_prevent_empty_spots", False)))
        pictures.insert(0, image_grid(pictures, rows))
        infotexts.insert(0, create_infotext(gen.prompt, gen.negative_prompt, first_params))
        index_of_first_image = 1

    if req.save_images and save is not None:
        save(pictures, infotexts, len(pictures) > len(result.images), opts)
    images: list[str] = []
    if req.send_images:
        fmt = str(opts.get("samples_format", "png"))
        embed = bool(opts.get("enable_pnginfo", True))
        images = [
            encode_image(picture, fmt, text if embed else None, int(opts.get("jpeg_quality", 80)),
                         lossless=bool(opts.get("webp_lossless", False)))
            for picture, text in zip(pictures, infotexts)
        ]

    restore_faces = bool(req.restore_faces)
    info = {
        "prompt": gen.prompt,
        "all_prompts": [gen.prompt] * count,
        "negative_prompt": gen.negative_prompt,
        "all_negative_prompts": [gen.negative_prompt] * count,
        "seed": all_seeds[0],
        "all_seeds": all_seeds,
        "subseed": all_subseeds[0],
        "all_subseeds": all_subseeds,
        "subseed_strength": gen.seeds.subseed_strength,
        "width": gen.width,
        "height": gen.height,
        "sampler_name": names.sampler_label(gen.sampling.sampler),
        "cfg_scale": gen.sampling.cfg_scale,
        "steps": gen.sampling.steps,
        "batch_size": gen.batch_size,
        "restore_faces": restore_faces,
        "face_restoration_model": opts.get("face_restoration_model") if restore_faces else None,
        "sd_model_name": result.model_name,
        "sd_model_hash": result.model_hash,
        "sd_vae_name": result.vae_name,
        "sd_vae_hash": result.vae_hash,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": _denoising_for_info(req, gen),
        "extra_generation_params": {
            k: v for k, v in first_params.items() if k not in _INFO_FIXED and v is not None
        },
        "index_of_first_image": index_of_first_image,
        "infotexts": infotexts,
        "styles": list(req.styles or []),
        "job_timestamp": str(job_timestamp),
        "clip_skip": gen.clip_skip,
        "is_using_inpainting_conditioning": result.is_using_inpainting_conditioning,
        "version": version,
    }
    return {
        "images": images,
        "parameters": _echo_parameters(req),
        "info": json.dumps(info, default=lambda _o: None),
    }
