"""Latent upscale modes: hires fix can enlarge the first pass's latent directly instead of decoding it.

The names are A1111's (`/sdapi/v1/latent-upscale-modes`, `hr_upscaler`); each is one
`torch.nn.functional.interpolate` mode, optionally antialiased.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch
import torch.nn.functional as F

from sdserver.errors import InvalidRequest


@dataclass(frozen=True)
class LatentMode:
    name: str
    interpolation: str  # a torch.nn.functional.interpolate mode
    antialias: bool


LATENT_MODES: Mapping[str, LatentMode] = MappingProxyType(
    {
        mode.name: mode
        for mode in (
            LatentMode("Latent", "bilinear", False),
            LatentMode("Latent (antialiased)", "bilinear", True),
            LatentMode("Latent (bicubic)", "bicubic", False),
            LatentMode("Latent (bicubic antialiased)", "bicubic", True),
            LatentMode("Latent (nearest)", "nearest", False),
            LatentMode("Latent (nearest-exact)", "nearest-exact", False),
        )
    }
)
# What A1111 uses when hr_upscaler is null.
DEFAULT_LATENT_MODE = "Latent"


def is_latent_mode(name: str | None) -> bool:
    return name in LATENT_MODES


def upscale_latent(
    latent: torch.Tensor, width: int, height: int, mode: str, *, field: str = "hr_upscaler"
) -> torch.Tensor:
    """`latent` (B, C, h, w) interpolated to (B, C, height, width).

    `width` and `height` are in latent cells, not pixels: for SD's VAE pass `target_width // 8`.
    """
    spec = LATENT_MODES.get(mode)
    if spec is None:
        allowed = ", ".join(LATENT_MODES)
        raise InvalidRequest(f"unknown latent upscale mode '{mode}'; allowed: {allowed}", field=field)
    if width < 1 or height < 1:
        raise InvalidRequest(f"latent upscale target {width}x{height} is empty", field=field)
    # CPU kernels for antialiased and bicubic modes don't cover half precision; compute those in float32.
    work = latent.float() if latent.device.type == "cpu" and latent.dtype in (torch.float16, torch.bfloat16) else latent
    align = False if spec.interpolation in ("bilinear", "bicubic") else None
    out = F.interpolate(
        work, size=(height, width), mode=spec.interpolation, antialias=spec.antialias, align_corners=align
    )
    return out.to(latent.dtype)
