"""A1111's infotext ("generation parameters"): writer, parser, and reading it back out of images.

Format (A1111 1.10 `processing.create_infotext` / `infotext_utils.parse_generation_parameters`):

    <prompt>
    Negative prompt: <negative prompt>            (left out when empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 1, Size: 512x512, ...

The last line lists non-null values in a fixed key order, with the "extra" keys in between. Values that contain
`,`, `:` or a newline are JSON-quoted. sdserver writes its own version string in `Version` (A1111 writes e.g.
`v1.10.1`): readers treat the value as free text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from PIL import Image

from sdserver.api.a1111 import names
from sdserver.engine.types import GenerationRequest, GenerationResult, NoiseSource, SamplingParams

A1111_VERSION = "v1.10.1"

# Keys written before the extras, in A1111's order. Extras that repeat one of these keep this position.
FIXED_KEYS_BEFORE: tuple[str, ...] = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE",
    "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength",
    "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr",
    "Init image hash", "RNG", "Tiling",
)
FIXED_KEYS_AFTER: tuple[str, ...] = ("Version", "User")

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286


def version_string(server_version: str) -> str:
    """The `Version` value and `info.version`: sdserver's own, so images say what made them."""
    return f"sdserver-{server_version}"


def quote(value: Any) -> Any:
    """A1111's rule: a value whose text holds `,`, `:` or a newline is written as a JSON string."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_params(params: Mapping[str, Any]) -> str:
    """The parameter line: `k: v` for non-null values, in the mapping's order; a value equal to its key alone."""
    return ", ".join(
        key if key == value else f"{key}: {quote(value)}" for key, value in params.items() if value is not None
    )


def order_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Fixed keys first and last in A1111's order; every other key in between, in insertion order."""
    fixed = set(FIXED_KEYS_BEFORE) | set(FIXED_KEYS_AFTER)
    ordered = {key: params.get(key) for key in FIXED_KEYS_BEFORE}
    ordered.update((key, value) for key, value in params.items() if key not in fixed)
    ordered.update((key, params.get(key)) for key in FIXED_KEYS_AFTER)
    return ordered


def _hashes(pairs: tuple[tuple[str, str], ...]) -> str | None:
    """A1111's "name: hash, name2: hash2", with ':' and ',' taken out of names so the line still parses."""
    if not pairs:
        return None
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in pairs)


def create_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The full infotext: prompt, optional negative prompt line, and the ordered parameter line."""
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{format_params(order_params(params))}".strip()


def _rng_label(source: NoiseSource) -> str | None:
    # A1111 omits RNG for its default, GPU; sdserver's default is CPU, so `RNG: CPU` appears by default.
    return {NoiseSource.CPU: "CPU", NoiseSource.NV: "NV", NoiseSource.GPU: None}[source]


def _has_emphasis(text: str) -> bool:
    return any(ch in text for ch in "()[]")


def effective_eta(sampling: SamplingParams) -> float:
    """The eta a sampler runs with: the request's, else the option for its kind (eta_ddim / eta_ancestral)."""
    if sampling.eta is not None:
        return sampling.eta
    kind = names.sampler_by_id(sampling.sampler).kind
    return sampling.eta_ddim if kind == "timesteps" else sampling.eta_ancestral


def _sampler_params(gen: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
    """Keys A1111's samplers add to extra_generation_params (eta, s_*, schedule overrides)."""
    s = gen.sampling
    sampler = names.sampler_by_id(s.sampler)
    out: dict[str, Any] = {}
    if sampler.uses_eta:
        eta = effective_eta(s)
        if sampler.kind == "timesteps" and eta != 0.0:
            out["Eta DDIM"] = eta
        elif sampler.kind == "kdiffusion" and eta != 1.0:
            out["Eta"] = eta
    defaults = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
    labels = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
    for param in sampler.sigma_params:
        value = getattr(s, param)
        if value != defaults[param]:
            out[labels[param]] = value
    if sampler.kind != "kdiffusion":
        return out
    if s.always_discard_next_to_last_sigma and not sampler.options.get("discard_next_to_last_sigma"):
        out["Discard penultimate sigma"] = True
    if s.sigma_max:
        out["Schedule max sigma"] = s.sigma_max
    if s.sigma_min:
        out["Schedule min sigma"] = s.sigma_min
    effective = names.scheduler_by_id(names.effective_scheduler_id(s.sampler, s.scheduler))
    if s.rho and effective.default_rho != -1 and s.rho != effective.default_rho:
        out["Schedule rho"] = s.rho
    if effective.id == "beta":
        out["Beta schedule alpha"] = options.get("beta_dist_alpha", 0.6)
        out["Beta schedule beta"] = options.get("beta_dist_beta", 0.6)
    return out


def _hires_params(gen: GenerationRequest) -> dict[str, Any]:
    hires = gen.hires
    if hires is None:
        return {}
    out: dict[str, Any] = {}
    if hires.resize_x == 0 and hires.resize_y == 0:
        out["Hires upscale"] = hires.scale
    else:
        out["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
    if hires.second_pass_steps:
        out["Hires steps"] = hires.second_pass_steps
    out["Hires upscaler"] = hires.upscaler
    if hires.sampler is not None:
        out["Hires sampler"] = names.sampler_label(hires.sampler)
    if hires.scheduler is not None and hires.scheduler != gen.sampling.scheduler:
        out["Hires schedule type"] = names.scheduler_label(hires.scheduler)
    if hires.checkpoint is not None:
        out["Hires checkpoint"] = hires.checkpoint
    if hires.prompt and hires.prompt != gen.prompt:
        out["Hires prompt"] = hires.prompt
    if hires.negative_prompt and hires.negative_prompt != gen.negative_prompt:
        out["Hires negative prompt"] = hires.negative_prompt
    if hires.cfg_scale is not None and hires.cfg_scale != gen.sampling.cfg_scale:
        out["Hires CFG Scale"] = hires.cfg_scale
    return out


def _inpaint_params(gen: GenerationRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    inpaint = gen.inpaint
    if inpaint is not None:
        if (inpaint.mask_blur_x > 0 or inpaint.mask_blur_y > 0) and inpaint.mask_blur_x == inpaint.mask_blur_y:
            out["Mask blur"] = inpaint.mask_blur_x
        if inpaint.full_res:
            out["Inpaint area"] = "Only masked"
            out["Masked area padding"] = inpaint.full_res_padding
        if inpaint.fill != 1:
            out["Masked content"] = MASKED_CONTENT[inpaint.fill]
        if inpaint.invert:
            out["Mask mode"] = "Inpaint not masked"
    if gen.is_img2img and gen.initial_noise_multiplier != 1.0:
        out["Noise multiplier"] = gen.initial_noise_multiplier
    return out


def _refiner_params(result: GenerationResult) -> dict[str, Any]:
    """A1111 writes these when sampling switched to the refiner: its short title (file name without folder or
    extension, then the short hash) and the switch point."""
    used = result.refiner
    if used is None:
        return {}
    out: dict[str, Any] = {}
    if used.by_sampling_steps:
        out["Refiner switch by sampling steps"] = True
    if used.hires_pass is not None:
        out["Hires refiner"] = used.hires_pass
    out["Refiner"] = f"{used.name} [{used.hash}]" if used.hash else used.name
    out["Refiner switch at"] = used.switch_at
    return out


def _uses_ensd(gen: GenerationRequest) -> bool:
    sampler = names.sampler_by_id(gen.sampling.sampler)
    return bool(sampler.options.get("uses_ensd")) and effective_eta(gen.sampling) != 0


def generation_params(
    gen: GenerationRequest,
    result: GenerationResult,
    options: Mapping[str, Any],
    *,
    seed: int,
    subseed: int,
    version: str,
) -> dict[str, Any]:
    """The infotext's key → value mapping for one image (None: leave the key out), in A1111's order."""
    s = gen.sampling
    seeds = gen.seeds
    if gen.is_img2img:
        denoising: float | None = gen.denoising_strength
    else:
        denoising = gen.hires.denoising_strength if gen.hires is not None else None
    params: dict[str, Any] = {
        "Steps": s.steps,
        "Sampler": names.sampler_label(s.sampler),
        "Schedule type": names.infotext_schedule_type(s.sampler, s.scheduler),
        "CFG scale": float(s.cfg_scale),
        "Seed": seed,
        "Size": f"{gen.width}x{gen.height}",
        "Model hash": result.model_hash if options.get("add_model_hash_to_info", True) else None,
        "Model": result.model_name if options.get("add_model_name_to_info", True) else None,
        "VAE hash": result.vae_hash if options.get("add_vae_hash_to_info", True) else None,
        "VAE": result.vae_name if options.get("add_vae_name_to_info", True) else None,
        "Variation seed": subseed if seeds.subseed_strength != 0 else None,
        "Variation seed strength": seeds.subseed_strength if seeds.subseed_strength != 0 else None,
        "Seed resize from": (
            f"{seeds.seed_resize_from_w}x{seeds.seed_resize_from_h}"
            if seeds.seed_resize_from_w > 0 and seeds.seed_resize_from_h > 0
            else None
        ),
        "Denoising strength": denoising,
        "Conditional mask weight": (
            gen.inpainting_mask_weight if result.is_using_inpainting_conditioning else None
        ),
        "Clip skip": gen.clip_skip if gen.clip_skip > 1 else None,
        "ENSD": seeds.eta_noise_seed_delta if seeds.eta_noise_seed_delta != 0 and _uses_ensd(gen) else None,
        "RNG": _rng_label(seeds.noise_source),
        "Tiling": "True" if gen.tiling else None,
    }
    params.update(_hires_params(gen))
    params["Lora hashes"] = _hashes(result.network_hashes)
    params["TI hashes"] = _hashes(result.embedding_hashes)
    params.update(result.extra_params)
    if gen.emphasis != "Original" and _has_emphasis(gen.prompt + gen.negative_prompt):
        params["Emphasis"] = gen.emphasis
    params.update(_inpaint_params(gen))
    params.update(_sampler_params(gen, options))
    params.update(_refiner_params(result))
    if s.sgm_noise_multiplier and not gen.is_img2img:
        params["SGM noise multiplier"] = True
    if options.get("use_old_scheduling"):
        params["Old prompt editing timelines"] = True
    params["Version"] = version if options.get("add_version_to_infotext", True) else None
    return order_params(params)


# ---- parsing ---------------------------------------------------------------------------------------------

# What A1111's parser adds when a key is missing, so readers get a value for every UI field.
_PARSE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("Clip skip", "1"),
    ("Hires resize-1", 0),
    ("Hires resize-2", 0),
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def parse_infotext(text: str, *, add_defaults: bool = True) -> dict[str, Any]:
    """An infotext → A1111's parameter dict: values are strings as written ("Steps": "20"), `WxH` values split
    into `<key>-1`/`<key>-2`, plus "Prompt" and "Negative prompt", plus A1111's defaults for missing keys."""
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    res: dict[str, Any] = {}
    for key, value in _RE_PARAM.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = _RE_IMAGESIZE.match(value)
        if size is not None:
            res[f"{key}-1"] = size.group(1)
            res[f"{key}-2"] = size.group(2)
        else:
            res[key] = value
    res["Prompt"] = "\n".join(prompt_lines)
    res["Negative prompt"] = "\n".join(negative_lines)
    if add_defaults:
        for key, default in _PARSE_DEFAULTS:
            res.setdefault(key, default)
    return res


# ---- reading images ---------------------------------------------------------------------------------------

# image.info entries that are format details, not metadata a user wrote (A1111's list).
_IGNORED_INFO = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop", "transparency",
    "gamma", "aspect", "srgb",
})


def decode_user_comment(raw: bytes) -> str:
    """An EXIF UserComment: an 8-byte charset prefix, then the text (UNICODE is UTF-16, big-endian as piexif)."""
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        if body[:2] == b"\xff\xfe":
            return body[2:].decode("utf-16-le", errors="replace")
        if body[:2] == b"\xfe\xff":
            body = body[2:]
        return body.decode("utf-16-be", errors="replace")
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="ignore").rstrip("\x00")


def encode_user_comment(text: str) -> bytes:
    return b"UNICODE\x00" + text.encode("utf-16-be")


def read_exif_comment(image: Image.Image) -> str | None:
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    except Exception:  # noqa: BLE001 - a malformed EXIF block just means "no comment"
        return None
    if isinstance(raw, bytes) and raw:
        return decode_user_comment(raw)
    if isinstance(raw, str) and raw:
        return raw
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value]
    return str(value)


def _novelai_infotext(items: Mapping[str, Any], size: tuple[int, int]) -> str | None:
    """NovelAI PNGs keep the prompt in `Description` and the settings as JSON in `Comment` (A1111 reads them)."""
    try:
        settings = json.loads(items["Comment"])
        found = names.find_sampler(str(settings.get("sampler", "")))
        sampler = found.label if found is not None else "Euler a"
        return (
            f"{items['Description']}\nNegative prompt: {settings['uc']}\n"
            f"Steps: {settings['steps']}, Sampler: {sampler}, CFG scale: {settings['scale']}, "
            f"Seed: {settings['seed']}, Size: {size[0]}x{size[1]}, Clip skip: 2, ENSD: 31337"
        )
    except (KeyError, TypeError, ValueError):
        return None


def png_info(image: Image.Image) -> dict[str, Any]:
    """`/png-info`'s `{info, items, parameters}` for a decoded image: the PNG `parameters` text chunk, else
    the EXIF UserComment (JPEG/WebP), a GIF comment, or NovelAI's Description/Comment pair."""
    items = {k: v for k, v in (image.info or {}).items() if isinstance(k, str)}
    info = items.pop("parameters", None)
    comment = read_exif_comment(image)
    if comment is not None:
        items["exif comment"] = comment
        if info is None:
            info = comment
    if info is None and isinstance(items.get("comment"), (bytes, str)):
        raw = items.pop("comment")
        info = raw.decode("utf-8", errors="ignore") if isinstance(raw, bytes) else raw
    if info is None and items.get("Software") == "NovelAI":
        info = _novelai_infotext(items, image.size)
    items = {k: _json_safe(v) for k, v in items.items() if k not in _IGNORED_INFO}
    if not isinstance(info, str):
        info = None
    # A1111 parses even an empty text, so `parameters` always carries the defaults.
    parameters = parse_infotext(info or "")
    return {"info": info or "", "items": items, "parameters": parameters}
