"""The extras (postprocessing) work behind `/sdapi/v1/extra-single-image` and `/extra-batch-images`.

A1111 semantics: upscaler 1 enlarges the image either by `upscaling_resize` (resize_mode 0) or to cover
`upscaling_resize_w` × `upscaling_resize_h` (resize_mode 1, centre-cropped to that size when `upscaling_crop`);
upscaler 2, when set and visible, upscales the same input the same way and is blended over the first with
`extras_upscaler_2_visibility`. Like A1111, an upscaled side is rounded down to a multiple of 8 (before any
crop). Upscaler 1 "None" means no upscaling at all. The infotext lists what was done
(`Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos`) and is returned as A1111's `<p>...</p>` html.

Face restoration (GFPGAN, CodeFormer) is not installed: a non-zero visibility is refused naming the field.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from sdserver.errors import InvalidRequest

_NONE = "None"


class PixelUpscalers(Protocol):
    """What extras needs of `sdserver.upscalers.registry.UpscalerRegistry`."""

    def has(self, name: str) -> bool: ...

    def upscale(
        self,
        image: Image.Image,
        scale: float,
        name: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        field: str,
        multiple: int,
    ) -> Image.Image: ...


@dataclass(frozen=True)
class ExtrasParams:
    """The extras request's fields, under their A1111 names (errors name them)."""

    resize_mode: int = 0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str | None = _NONE
    upscaler_2: str | None = _NONE
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False  # accepted; A1111 1.10 orders postprocessing by script order, not by this flag
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0


def _is_none(name: str | None) -> bool:
    return name is None or name == "" or name == _NONE


def _validate(params: ExtrasParams) -> None:
    for field, label in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
        if getattr(params, field) > 0:
            raise InvalidRequest(
                f"{field} is {getattr(params, field)}, but no face restorer is installed ({label} model missing); "
                "send 0",
                field=field,
            )
    if params.resize_mode not in (0, 1):
        raise InvalidRequest(f"resize_mode must be 0 (scale by) or 1 (scale to), not {params.resize_mode}",
                             field="resize_mode")
    if params.resize_mode == 0 and not params.upscaling_resize > 0:
        raise InvalidRequest("upscaling_resize must be greater than 0", field="upscaling_resize")
    if params.resize_mode == 1:
        for field in ("upscaling_resize_w", "upscaling_resize_h"):
            if getattr(params, field) < 1:
                raise InvalidRequest(f"{field} must be at least 1", field=field)
    if not 0 <= params.extras_upscaler_2_visibility <= 1:
        raise InvalidRequest("extras_upscaler_2_visibility must be between 0 and 1",
                             field="extras_upscaler_2_visibility")


def _quote(value: object) -> object:
    """An infotext value, JSON-quoted when it holds a separator (A1111's infotext quoting)."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def infotext_to_html(text: str) -> str:
    """A1111's plaintext_to_html: escaped lines joined by `<br>`, in one paragraph."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _upscale_once(
    image: Image.Image,
    info: dict[str, object],
    name: str,
    field: str,
    params: ExtrasParams,
    upscalers: PixelUpscalers,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Image.Image:
    if params.resize_mode == 1:
        width, height = params.upscaling_resize_w, params.upscaling_resize_h
        scale = max(width / image.width, height / image.height)
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        scale = params.upscaling_resize
        info["Postprocess upscale by"] = params.upscaling_resize
    # A1111's upscalers round each side down to a multiple of 8 before any crop.
    out = upscalers.upscale(image, scale, name, device=device, dtype=dtype, field=field, multiple=8)
    if params.resize_mode == 1 and params.upscaling_crop:
        canvas = Image.new("RGB", (width, height))
        canvas.paste(out, box=(width // 2 - out.width // 2, height // 2 - out.height // 2))
        out = canvas
        info["Postprocess crop to"] = f"{width}x{height}"
    return out


def run_extras(
    image: Image.Image,
    params: ExtrasParams,
    upscalers: PixelUpscalers,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Image.Image, str]:
    """The postprocessed image and its `html_info`.

    The result carries the input's text chunks (its `parameters` infotext included) plus a `postprocessing`
    entry, as A1111's image.info, so an encoder that writes text chunks keeps them.
    """
    _validate(params)
    source = image.convert("RGB")
    info: dict[str, object] = {}
    result = source.copy()
    if not _is_none(params.upscaler_1):
        name_1 = str(params.upscaler_1)
        if not upscalers.has(name_1):
            raise InvalidRequest(f"unknown upscaler '{name_1}'", field="upscaler_1")
        name_2 = None if _is_none(params.upscaler_2) else str(params.upscaler_2)
        if name_2 is not None and not upscalers.has(name_2):
            raise InvalidRequest(f"unknown upscaler '{name_2}'", field="upscaler_2")
        result = _upscale_once(source, info, name_1, "upscaler_1", params, upscalers, device, dtype)
        info["Postprocess upscaler"] = name_1
        if name_2 is not None and params.extras_upscaler_2_visibility > 0:
            second = _upscale_once(source, info, name_2, "upscaler_2", params, upscalers, device, dtype)
            result = Image.blend(result, second.convert(result.mode), params.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = name_2
    infotext = ", ".join(key if key == value else f"{key}: {_quote(value)}" for key, value in info.items())
    result.info = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    result.info["postprocessing"] = infotext
    return result, infotext_to_html(infotext)
