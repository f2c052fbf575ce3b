"""Conversions between PIL images, pixel tensors and latents."""

from __future__ import annotations

import logging
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1, 1] → RGB images, truncating to 8 bits as A1111 does (not rounding); NaN is black."""
    arr = ((images.float().cpu().nan_to_num(-1.0) + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()
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
        return tensor_to_pil(decode_latents(model, latent[None]))[0]

    return full


def decode_latents(model, latents: torch.Tensor, *, auto_precision: bool = True) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Images in about [-1, 1] from scaled latents, as `model.decode_latent`; a half-precision VAE whose decode
    overflows into NaN/inf is converted to float32 (and stays so, as A1111's `auto_vae_precision` does) and the
    decode redone. fp16 SD 1.x and SDXL VAEs overflow on some latents; fp32 is the fix A1111 applies."""
    with torch.no_grad():
        decoded = model.decode_latent(latents)
        if bool(torch.isfinite(decoded).all()):
            return decoded
        vae_dtype = next(model.vae.parameters()).dtype
        if not auto_precision or vae_dtype == torch.float32:
            log.warning("VAE decode in %s produced NaN/inf values; the image will have black pixels", vae_dtype)
            return decoded
        log.warning(
            "VAE decode in %s produced NaN/inf values; converting the VAE to float32 and decoding again "
            "(auto_vae_precision; --no-half-vae avoids this)",
            vae_dtype,
        )
        model.vae.to(torch.float32)
        return model.decode_latent(latents)
