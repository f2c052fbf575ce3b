"""Pixel-side helpers for img2img and inpainting, with A1111's semantics (sizes, rounding, blur, overlay).

Pure functions over PIL images, numpy arrays and CPU tensors; nothing here touches a model. The img2img
pipeline composes them:

    image = flatten_alpha(init, "#ffffff")
    mask = prepare_mask(raw_mask, invert=..., blur_x=..., blur_y=..., round=...)
    whole picture:  image, mask = resize_image(mode, image, w, h, up), resize_image(mode, mask, w, h)
                    overlay_mask = mask_for_overlay(mask, full_res=False)
    only masked:    region = crop_region(mask, padding) → expand_to_aspect(region, w, h, *mask.size)
                    image and mask crops resized with resize_image(2, ...)
                    overlay_mask = mask_for_overlay(mask, full_res=True)
    inpainting_fill 0: image = fill_masked(image, mask)
    after decoding: apply_overlay(generated, image, overlay_mask) or paste_back(original, generated, region, mask)

`prepare_img2img_images` / `finish_img2img_image` compose exactly that sequence, in A1111's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

LANCZOS = Image.Resampling.LANCZOS

# (image, scale) → image at least `scale` times larger; the img2img upscaler, e.g. a bound UpscalerRegistry.upscale.
UpscalerFn = Callable[[Image.Image, float], Image.Image]
Region = tuple[int, int, int, int]  # x1, y1, x2, y2 (x2, y2 exclusive), PIL's box order

# A1111's "fill" (inpainting_fill 0): premultiplied blurs of the unmasked image, widest first, composited
# (radius, times) so near colours win over far ones.
_FILL_LAYERS: tuple[tuple[int, int], ...] = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
# A1111 thresholds an alpha mask at this level when mask_round is on.
_ALPHA_THRESHOLD = 128


# -- conversions ---------------------------------------------------------------------------------------------


def flatten_alpha(image: Image.Image, background: str | tuple[int, int, int] = "#ffffff") -> Image.Image:
    """An RGB image with any transparency composited onto `background` (A1111's img2img_background_color)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "RGB", "L") and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background)
    canvas.paste(rgba, mask=rgba)  # paste through alpha, not alpha_composite: A1111's exact rounding
    return canvas.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]. For the VAE encoder, map to [-1, 1] with `x * 2 - 1`."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → RGB image. Clamps, then truncates to 8 bits as A1111 does (not rounding: §12)."""
    arr = x.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1).numpy()
    arr = np.float32(255.0) * np.moveaxis(arr, 0, 2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def decoded_to_pils(batch: torch.Tensor) -> list[Image.Image]:
    """A VAE decoder's output, (B, 3, H, W) in [-1, 1], as images."""
    return [tensor_to_pil((x.float() + 1.0) / 2.0) for x in batch]


# -- resizing ------------------------------------------------------------------------------------------------


def _resize(image: Image.Image, width: int, height: int, upscaler_fn: UpscalerFn | None) -> Image.Image:
    # Masks (mode L) and "no upscaler" use a plain Lanczos resize; an upscaler only runs when enlarging.
    if upscaler_fn is not None and image.mode != "L":
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = upscaler_fn(image, scale)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


def resize_image(
    mode: int, image: Image.Image, width: int, height: int, upscaler_fn: UpscalerFn | None = None
) -> Image.Image:
    """`image` brought to width × height by A1111's resize mode.

    0 just resize (stretch); 1 crop and resize (cover, centre crop); 2 resize and fill (fit, then stretch the
    edge rows/columns into the bars). Mode 3 (latent upscale) means the caller resizes the latent instead; given
    here (as A1111 does for masks) it behaves as 2.
    """
    if mode == 0:
        return _resize(image, width, height, upscaler_fn)
    ratio, src_ratio = width / height, image.width / image.height
    canvas_mode = "L" if image.mode == "L" else "RGB"
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = _resize(image, src_w, src_h, upscaler_fn)
        out = Image.new(canvas_mode, (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out

    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = _resize(image, src_w, src_h, upscaler_fn)
    out = Image.new(canvas_mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    # A zero-height (or zero-width) box stretches the image's edge row (column) across each bar. Like A1111,
    # an odd leftover leaves the far bar one pixel short.
    if ratio < src_ratio:
        bar = height // 2 - src_h // 2
        if bar > 0:
            out.paste(resized.resize((width, bar), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, bar), box=(0, src_h, width, src_h)), box=(0, bar + src_h))
    elif ratio > src_ratio:
        bar = width // 2 - src_w // 2
        if bar > 0:
            out.paste(resized.resize((bar, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((bar, height), box=(src_w, 0, src_w, height)), box=(bar + src_w, 0))
    return out


# -- masks ---------------------------------------------------------------------------------------------------


def gaussian_kernel_size(sigma: float) -> int:
    """A1111's kernel width for a mask blur of `sigma` px: 2·int(2.5σ + 0.5) + 1."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def _blur_axis(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One axis of OpenCV's GaussianBlur on a uint8 array: sampled Gaussian kernel, reflect-101 borders, rounded."""
    size = gaussian_kernel_size(sigma)
    radius = size // 2
    offsets = np.arange(size, dtype=np.float64) - radius
    kernel = np.exp(-(offsets**2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (radius, radius)
    # numpy's "reflect" mirrors without repeating the edge pixel: OpenCV's default BORDER_REFLECT_101.
    padded = np.pad(arr.astype(np.float64), pad, mode="reflect")
    # Convolve through the FFT: blur 64 has a 321-tap kernel, which a direct sum makes slow on big masks.
    n_fft = 1 << (padded.shape[axis] + size - 2).bit_length()
    spectrum = np.fft.rfft(padded, n_fft, axis=axis)
    shape = [1] * arr.ndim
    shape[axis] = -1
    full = np.fft.irfft(spectrum * np.fft.rfft(kernel, n_fft).reshape(shape), n_fft, axis=axis)
    out = np.take(full, np.arange(size - 1, size - 1 + arr.shape[axis]), axis=axis)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def binary_mask(mask: Image.Image, *, round: bool) -> Image.Image:
    """A mode-L mask, white = inpaint. An RGBA mask with real transparency uses its alpha (thresholded at 128 when
    `round`); any other mask is converted to grey as is (A1111's create_binary_mask)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.getchannel("A")
        return alpha.point(lambda v: 255 if v > _ALPHA_THRESHOLD else 0) if round else alpha
    return mask.convert("L")


def prepare_mask(mask: Image.Image, *, invert: bool, blur_x: float, blur_y: float, round: bool) -> Image.Image:
    """The inpainting mask as A1111 prepares it, at the mask's own size: binarised alpha, optional inversion, then
    a horizontal and a vertical Gaussian blur (each rounded to 8 bits, as OpenCV's two separate calls)."""
    out = binary_mask(mask, round=round)
    if invert:
        out = ImageOps.invert(out)
    arr = np.asarray(out)
    if blur_x > 0:
        arr = _blur_axis(arr, blur_x, axis=1)
    if blur_y > 0:
        arr = _blur_axis(arr, blur_y, axis=0)
    return Image.fromarray(np.ascontiguousarray(arr), "L")


def latent_mask(mask: Image.Image, width: int, height: int, *, round: bool) -> np.ndarray:
    """(height, width) float32 in [0, 1], 1 where the latent is regenerated: the processing-size mask resized
    (bicubic, Pillow's default) to latent size, rounded to 0/1 when `round`."""
    small = mask.convert("L").resize((width, height), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(small, dtype=np.float32) / np.float32(255.0)
    return np.round(arr) if round else arr


def crop_region(mask: Image.Image, padding: int) -> Region | None:
    """The bounding box of the mask's non-zero pixels grown by `padding` and clipped to the image; None when the
    mask is empty (A1111 then falls back to whole-picture inpainting)."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height))


def expand_to_aspect(region: Region, width: int, height: int, image_w: int, image_h: int) -> Region:
    """`region` grown (centred, then shifted back inside the image) to width:height's aspect ratio, as A1111's
    expand_crop_region; it may stay narrower where the image is too small."""
    x1, y1, x2, y2 = region
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        grow = int((x2 - x1) / target - (y2 - y1))
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
        y1, y2 = _shift_inside(y1, y2, image_h)
    else:
        grow = int((y2 - y1) * target - (x2 - x1))
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
        x1, x2 = _shift_inside(x1, x2, image_w)
    return x1, y1, x2, y2


def _shift_inside(lo: int, hi: int, limit: int) -> tuple[int, int]:
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def mask_for_overlay(mask: Image.Image, *, full_res: bool) -> Image.Image:
    """The mask that decides which pixels keep the input after generation. Whole-picture inpainting doubles the
    blurred mask (clipped), so the overlay's soft edge sits inside the blurred area; "only masked" uses it as is."""
    if full_res:
        return mask.convert("L")
    arr = np.asarray(mask.convert("L"), dtype=np.float32) * 2
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def make_overlay(original: Image.Image, overlay_mask: Image.Image) -> Image.Image:
    """RGBA: the input's pixels, opaque where the mask is 0 and transparent where it is 255."""
    keep = ImageOps.invert(overlay_mask.convert("L"))
    # Pasting premultiplied (RGBa) through the mask and converting back reproduces A1111's overlay bytes exactly.
    layer = Image.new("RGBa", original.size)
    layer.paste(original.convert("RGBA").convert("RGBa"), mask=keep)
    return layer.convert("RGBA")


def apply_overlay(generated: Image.Image, original: Image.Image, overlay_mask: Image.Image) -> Image.Image:
    """`generated` with the input's pixels put back wherever `overlay_mask` is below 255 (A1111's overlay): where
    the mask is 0 the result is exactly the input."""
    if generated.size != original.size:
        raise ValueError(f"generated {generated.size} and original {original.size} differ in size")
    out = generated.convert("RGBA")
    out.alpha_composite(make_overlay(original, overlay_mask))
    return out.convert("RGB")


def _uncrop(generated: Image.Image, size: tuple[int, int], region: Region) -> Image.Image:
    """A transparent RGBA canvas of `size` with `generated` crop-and-resized (Lanczos) into `region`."""
    x1, y1, x2, y2 = region
    base = Image.new("RGBA", size)
    base.paste(resize_image(1, generated.convert("RGB"), x2 - x1, y2 - y1), (x1, y1))
    return base


def paste_back(original: Image.Image, generated_crop: Image.Image, region: Region, mask: Image.Image) -> Image.Image:
    """"Only masked" inpainting's result: the generated crop resized into `region` of the original and overlaid
    with the original through `mask` (the prepared mask at the original's size). The output has the original's
    size; pixels where the mask is 0 are the original's."""
    base = _uncrop(generated_crop, original.size, region)
    base.alpha_composite(make_overlay(original, mask_for_overlay(mask, full_res=True)))
    return base.convert("RGB")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """inpainting_fill 0 ("fill"): the masked area replaced by blurred colour from around it; unmasked pixels are
    kept."""
    keep = ImageOps.invert(mask.convert("L"))
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, times in _FILL_LAYERS:
        # Blurring premultiplied colour spreads the known pixels' colour in proportion to their coverage.
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


# -- composition: A1111's img2img image preparation and finishing ---------------------------------------------


@dataclass(frozen=True)
class Img2ImgImages:
    """The pixel side of an img2img / inpainting job, prepared as A1111's StableDiffusionProcessingImg2Img.init.

    `images` go to the VAE encoder (width × height, except with resize_mode 3, where the caller resizes the latent).
    `mask` (mode L, processing size) feeds `latent_mask` and inpainting-model conditioning; None means plain img2img.
    `overlays` (RGBA, one per image) restore the input's unmasked pixels after decoding; `paste_region` is set for
    "only masked" inpainting, whose result is pasted back into the original-size image.
    """

    images: tuple[Image.Image, ...]
    mask: Image.Image | None = None
    overlays: tuple[Image.Image, ...] | None = None
    paste_region: Region | None = None
    empty_mask_fallback: bool = False  # "only masked" with a blank mask: A1111 falls back to plain img2img


def prepare_img2img_images(
    init_images: Sequence[Image.Image],
    width: int,
    height: int,
    *,
    resize_mode: int = 0,
    mask: Image.Image | None = None,
    blur_x: float = 4,
    blur_y: float = 4,
    invert: bool = False,
    fill: int = 1,
    full_res: bool = False,
    padding: int = 0,
    round: bool = True,
    background: str = "#ffffff",
    upscaler_fn: UpscalerFn | None = None,
) -> Img2ImgImages:
    """Init images and mask → the job's pixel inputs. `fill` 0 fills the masked area from its surroundings; the
    latent fills (2 noise, 3 nothing) are the caller's, on the latent."""
    region: Region | None = None
    proc_mask: Image.Image | None = None
    overlay_mask: Image.Image | None = None
    fallback = False
    if mask is not None:
        prepared = prepare_mask(mask, invert=invert, blur_x=blur_x, blur_y=blur_y, round=round)
        if full_res:
            found = crop_region(prepared, padding)
            if found is None:
                fallback = True
            else:
                region = expand_to_aspect(found, width, height, prepared.width, prepared.height)
                proc_mask = resize_image(2, prepared.crop(region), width, height)
                overlay_mask = mask_for_overlay(prepared, full_res=True)
        else:
            proc_mask = resize_image(resize_mode, prepared, width, height)
            overlay_mask = mask_for_overlay(proc_mask, full_res=False)

    images: list[Image.Image] = []
    overlays: list[Image.Image] = []
    for init in init_images:
        image = flatten_alpha(init, background)
        if region is None and resize_mode != 3:
            image = resize_image(resize_mode, image, width, height, upscaler_fn)
        if overlay_mask is not None:
            if overlay_mask.size != image.size:
                overlay_mask = resize_image(resize_mode, overlay_mask, image.width, image.height)
            overlays.append(make_overlay(image, overlay_mask))
        if region is not None:
            image = resize_image(2, image.crop(region), width, height, upscaler_fn)
        if proc_mask is not None and fill != 1:
            # resize_mode 3 leaves the image at its own size (A1111 would fail here); fill at that size.
            fill_mask = proc_mask if proc_mask.size == image.size else proc_mask.resize(image.size, LANCZOS)
            image = fill_masked(image, fill_mask)
        images.append(image)
    return Img2ImgImages(
        images=tuple(images),
        mask=proc_mask,
        overlays=tuple(overlays) if proc_mask is not None else None,
        paste_region=region,
        empty_mask_fallback=fallback,
    )


def finish_img2img_image(generated: Image.Image, prepared: Img2ImgImages, index: int) -> Image.Image:
    """A decoded result with the input's unmasked pixels restored (and, for "only masked", pasted back into the
    original-size image). Without a mask the image is returned as is."""
    if prepared.overlays is None:
        return generated
    overlay = prepared.overlays[index % len(prepared.overlays)]
    if prepared.paste_region is not None:
        base = _uncrop(generated, overlay.size, prepared.paste_region)
    else:
        base = generated.convert("RGBA")
    base.alpha_composite(overlay)
    return base.convert("RGB")
