"""Images in and out of the A1111 API: base64 (raw or `data:` URL) ↔ PIL, with the infotext embedded."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from sdserver.api.a1111.infotext import encode_user_comment
from sdserver.errors import InvalidImage, InvalidRequest

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# Formats accepted as input. An allowlist, because some PIL plugins (EPS) run external programs to decode.
# (JPEG's opener also yields phones' MPO files.)
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


def _input_formats() -> list[str]:
    Image.init()  # loads PIL's plugins once; AVIF is there only when Pillow was built with it
    return [f for f in INPUT_FORMATS if f in Image.OPEN]


def _b64_payload(data: str, field: str) -> bytes:
    text = data.strip()
    match = _DATA_URL.match(text)
    if match is not None:
        if ";base64" not in match.group("params"):
            raise InvalidImage(f"{field}: only base64 data URLs are accepted", field=field)
        text = match.group("data")
    text = _WHITESPACE.sub("", text)
    text += "=" * (-len(text) % 4)  # some clients strip the padding
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"{field}: invalid base64 image data", field=field) from None


def decode_image(data: str, field: str, *, max_pixels: int, allow_remote: bool = False) -> Image.Image:
    """A request's image field → a loaded PIL image with its EXIF orientation applied.

    Accepts raw base64 and `data:image/...;base64,` URLs. URLs are refused: fetching them would let a request
    reach hosts the server can see (A1111 fetches them by default); even with `allow_remote` sdserver does not
    fetch yet and says so. The size is checked from the header, before any pixel is decoded.
    """
    if not isinstance(data, str) or not data.strip():
        raise InvalidImage(f"{field}: no image given", field=field)
    head = data.strip()[:8].lower()
    if head.startswith(("http://", "https://")):
        if allow_remote:
            raise InvalidImage(f"{field}: fetching images from URLs is not implemented; send base64", field=field)
        raise InvalidImage(f"{field}: image URLs are refused; send the image as base64", field=field)
    payload = _b64_payload(data, field)
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning fires before our limit could; our check below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=_input_formats())
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImage(
                    f"{field}: image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                    field=field,
                )
            image.load()
            image = ImageOps.exif_transpose(image)
    except InvalidImage:
        raise
    except Image.DecompressionBombError:
        raise InvalidImage(f"{field}: image is too large to decode", field=field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImage(f"{field}: not a readable image", field=field) from None
    return image


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGB, with transparent parts laid on `background` (A1111's `img2img_background_color`)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background)
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return image.convert("RGB")


def mask_to_l(mask: Image.Image) -> Image.Image:
    """An inpaint mask as "L": the alpha channel when it has transparency (A1111's rule), else luminance."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A")
    return mask.convert("L")


def _exif_with_comment(text: str) -> bytes:
    exif = Image.Exif()
    exif[_EXIF_IFD] = {_EXIF_USER_COMMENT: encode_user_comment(text)}
    return exif.tobytes()


def encode_image(
    img: Image.Image, fmt: str, infotext: str | None, quality: int = 80, *, lossless: bool = False
) -> str:
    """A PIL image → raw base64 (no `data:` prefix) in png/jpg/jpeg/webp.

    PNG keeps every text entry of `img.info` and puts `infotext` in the `parameters` chunk (tEXt, iTXt when
    not Latin-1); JPEG and WebP carry it as EXIF UserComment (UNICODE). `infotext=None` keeps what the image has.
    """
    pil_format = FORMATS.get(str(fmt).lower())
    if pil_format is None:
        raise InvalidRequest(
            f"Invalid image format {fmt!r}: use one of {', '.join(FORMATS)}", field="samples_format"
        )
    text = infotext if infotext is not None else img.info.get("parameters")
    buffer = io.BytesIO()
    if pil_format == "PNG":
        meta = PngImagePlugin.PngInfo()
        for key, value in img.info.items():
            if isinstance(key, str) and isinstance(value, str) and key != "parameters":
                meta.add_text(key, value)
        if isinstance(text, str):
            meta.add_text("parameters", text)
        img.save(buffer, format="PNG", pnginfo=meta)
    else:
        out = img.convert("RGB") if (pil_format == "JPEG" and img.mode != "RGB") else img
        kwargs: dict[str, object] = {"quality": int(quality)}
        if pil_format == "WEBP":
            kwargs["lossless"] = lossless
        if isinstance(text, str):
            kwargs["exif"] = _exif_with_comment(text)
        out.save(buffer, format=pil_format, **kwargs)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def grid_rows(count: int, batch_size: int, n_rows: int = -1, prevent_empty_spots: bool = False) -> int:
    """A1111's grid row count: `n_rows` when set, the batch size for 0, else about the square root."""
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    elif prevent_empty_spots:
        rows = max(math.floor(math.sqrt(count)), 1)
        while count % rows != 0:
            rows -= 1
    else:
        rows = round(math.sqrt(count))
    return max(min(rows, count), 1)


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """Images laid left to right, top to bottom, on black, each cell the first image's size."""
    width, height = images[0].size
    cols = math.ceil(len(images) / rows)
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), box=(i % cols * width, i // cols * height))
    return grid
