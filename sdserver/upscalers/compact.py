"""SRVGGNetCompact, Real-ESRGAN's small VGG-style generator (realesr-general-x4v3, realesr-animevideov3).

Architecture after Wang et al., Real-ESRGAN (2021): a plain stack of 3×3 convs with PReLU activations whose last
conv emits `out_ch · scale²` channels, pixel-shuffled to the output size and added to a nearest-neighbour
upscale of the input (the net learns only the residual). Keys: `body.N.weight` / `body.N.bias`, convs at even
N, PReLU slopes at odd N.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sdserver.errors import ModelLoadError

_BODY = re.compile(r"^body\.(\d+)\.(weight|bias)$")


@dataclass(frozen=True)
class CompactConfig:
    in_channels: int
    num_feat: int
    num_conv: int
    scale: int
    prelu: bool  # files without PReLU slopes used ReLU


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: CompactConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        c, nf = config.in_channels, config.num_feat
        layers: list[nn.Module] = [nn.Conv2d(c, nf, 3, 1, 1), self._act(nf)]
        for _ in range(config.num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), self._act(nf)]
        layers.append(nn.Conv2d(nf, c * config.scale**2, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def _act(self, nf: int) -> nn.Module:
        return nn.PReLU(num_parameters=nf) if self.config.prelu else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def is_compact(keys: set[str] | frozenset[str]) -> bool:
    return "body.0.weight" in keys and all(_BODY.match(k) for k in keys)


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> CompactConfig:
    convs = sorted(
        int(m.group(1)) for k, v in sd.items() if (m := _BODY.match(k)) and k.endswith("weight") and v.ndim == 4
    )
    if not convs or convs[0] != 0:
        raise ModelLoadError("compact (SRVGG) state dict has no body.0 conv")
    last = convs[-1]
    if last < 2 or last % 2:
        raise ModelLoadError(f"compact (SRVGG) state dict has an odd layer count (last conv body.{last})")
    first_w = sd["body.0.weight"]
    in_ch, nf = first_w.shape[1], first_w.shape[0]
    out_feat = sd[f"body.{last}.weight"].shape[0]
    scale = math.isqrt(out_feat // in_ch) if out_feat % in_ch == 0 else 0
    if scale < 1 or scale * scale * in_ch != out_feat:
        raise ModelLoadError(f"compact (SRVGG) last conv has {out_feat} channels: not {in_ch}·scale²")
    return CompactConfig(
        in_channels=in_ch, num_feat=nf, num_conv=(last - 2) // 2, scale=scale, prelu="body.1.weight" in sd
    )


def build_compact(sd: Mapping[str, torch.Tensor]) -> SRVGGNetCompact:
    net = SRVGGNetCompact(config_from_state_dict(sd))
    try:
        net.load_state_dict(dict(sd), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"compact (SRVGG) weights don't fit the detected architecture: {exc}") from None
    return net.eval()
