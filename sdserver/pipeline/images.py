"""Conversions between PIL images, pixel tensors and latents."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import torch
from PIL import Image


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1, 1] → RGB images, truncating to 8 bits as A1111 does (not rounding)."""
    arr = ((images.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((255.0 * a).astype(np.uint8)) for a in arr]


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size → [B,3,H,W] in [-1, 1]."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


# Fixed least-squares maps from each family's latents to RGB, for previews without decoding ("Approx cheap").
# SD 1.x and 2.x share a VAE; SDXL's has its own latent space.
_APPROX_RGB = MappingProxyType({
    "sd1": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
})


def approx_preview(latent: torch.Tensor, family: str = "sd1") -> Image.Image:
    """A cheap RGB preview of one latent [C,h,w] by the family's fixed linear projection (no VAE)."""
    table = _APPROX_RGB.get(family, _APPROX_RGB["sd1"])
    weights = torch.tensor(table) if latent.shape[0] == len(table) else torch.zeros(latent.shape[0], 3)
    rgb = torch.einsum("chw,cr->rhw", latent.float().cpu(), weights)
    return tensor_to_pil(rgb[None].clamp(-1, 1))[0]


def preview_function(model, method: str):  # type: ignore[no-untyped-def]
    """The live-preview decoder: "Full" runs the VAE, anything else the cheap fixed projection."""
    if method != "Full":
        return lambda latent: approx_preview(latent, model.family)

    def full(latent: torch.Tensor) -> Image.Image:
        with torch.no_grad():
            return tensor_to_pil(model.decode_latent(latent[None]))[0]

    return full
