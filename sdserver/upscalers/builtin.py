"""The upscalers that need no model file: A1111's "None", "Lanczos" and "Nearest"."""

from __future__ import annotations

from PIL import Image

NONE = "None"
LANCZOS = "Lanczos"
NEAREST = "Nearest"
# A1111's /upscalers lists these first, in this order.
BUILTIN_NAMES: tuple[str, ...] = (NONE, LANCZOS, NEAREST)

_FILTERS = {NONE: Image.Resampling.LANCZOS, LANCZOS: Image.Resampling.LANCZOS, NEAREST: Image.Resampling.NEAREST}


def resize_builtin(image: Image.Image, width: int, height: int, name: str) -> Image.Image:
    """`image` resized to width × height by a built-in upscaler. "None" still has to reach the requested size, and
    A1111's fallback for that is a Lanczos resize."""
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), resample=_FILTERS[name])
