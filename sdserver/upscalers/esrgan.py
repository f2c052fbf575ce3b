"""RRDBNet, the ESRGAN / Real-ESRGAN generator, built from a state dict.

Architecture after Wang et al., "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks" (2018) and
"Real-ESRGAN" (2021): a trunk of residual-in-residual dense blocks, then nearest-neighbour ×2 upsampling steps,
each followed by a 3×3 conv. Real-ESRGAN's ×2 and ×1 models fold the input with a pixel unshuffle first, so the
same ×4 body yields a smaller total scale.

Three key layouts exist in the wild and all are mapped onto one canonical layout here:
- old ESRGAN (`model.0`, `model.1.sub.N.RDB1.conv1.0`, `model.3`, ...): a flattened nn.Sequential;
- new ESRGAN (`conv_first`, `RRDB_trunk.N.RDB1.conv1`, `trunk_conv`, `upconv1`, `HRconv`, `conv_last`);
- Real-ESRGAN / BasicSR (`conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`, `conv_hr`, `conv_last`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sdserver.errors import ModelLoadError

# ESRGAN's LeakyReLU slope and residual scaling: fixed by the published architecture, not stored in files.
_LRELU_SLOPE = 0.2
_RESIDUAL_SCALE = 0.2


@dataclass(frozen=True)
class RRDBConfig:
    in_channels: int
    out_channels: int
    num_feat: int
    num_blocks: int
    growth: int
    num_upsamples: int
    unshuffle: int  # 1, 2 or 4: the input pixel-unshuffle factor (Real-ESRGAN ×2 / ×1 models)

    @property
    def scale(self) -> int:
        return 2**self.num_upsamples // self.unshuffle


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class _DenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = _conv(nf, gc)
        self.conv2 = _conv(nf + gc, gc)
        self.conv3 = _conv(nf + 2 * gc, gc)
        self.conv4 = _conv(nf + 3 * gc, gc)
        self.conv5 = _conv(nf + 4 * gc, nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), _LRELU_SLOPE))
        return self.conv5(torch.cat(feats, 1)) * _RESIDUAL_SCALE + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1 = _DenseBlock(nf, gc)
        self.rdb2 = _DenseBlock(nf, gc)
        self.rdb3 = _DenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * _RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """The generator. Input and output are images in [0, 1], (B, C, H, W); any H, W."""

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        nf = config.num_feat
        self.conv_first = _conv(config.in_channels, nf)
        self.body = nn.Sequential(*[_RRDB(nf, config.growth) for _ in range(config.num_blocks)])
        self.conv_body = _conv(nf, nf)
        self.ups = nn.ModuleList([_conv(nf, nf) for _ in range(config.num_upsamples)])
        self.conv_hr = _conv(nf, nf)
        self.conv_last = _conv(nf, config.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = self.config.unshuffle
        if f > 1:
            # Pixel unshuffle needs sides divisible by f; pad by edge replication and crop the output back.
            x = F.pad(x, (0, (-w) % f, 0, (-h) % f), mode="replicate")
            x = F.pixel_unshuffle(x, f)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), _LRELU_SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), _LRELU_SLOPE))
        return out[..., : h * self.scale, : w * self.scale]


_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_LR = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_NEW_RDB = re.compile(r"^(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)(\d)\.conv(\d)\.(weight|bias)$")
_NEW_UP = re.compile(r"^(?:conv_up|upconv)(\d+)\.(weight|bias)$")
_NEW_RENAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr"}


def _canonical_from_old(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    top: dict[int, dict[str, torch.Tensor]] = {}
    num_blocks = len({m.group(1) for k in sd if (m := _OLD_RDB.match(k))})
    for key, value in sd.items():
        if m := _OLD_RDB.match(key):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif (m := _OLD_LR.match(key)) and int(m.group(1)) == num_blocks:
            out[f"conv_body.{m.group(2)}"] = value
        elif m := _OLD_TOP.match(key):
            top.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            raise ModelLoadError(f"unexpected ESRGAN tensor '{key}'")
    if 0 not in top:
        raise ModelLoadError("ESRGAN state dict has no model.0 (first conv)")
    # The flattened Sequential is [conv_first, trunk, (upsample, conv, act)*n, conv_hr, act, conv_last]:
    # every conv after the trunk is an upsampling conv except the last two.
    tail = sorted(i for i in top if i > 1)
    if len(tail) < 2:
        raise ModelLoadError("ESRGAN state dict lacks its final convolutions")
    names = {0: "conv_first", tail[-2]: "conv_hr", tail[-1]: "conv_last"}
    names.update({idx: f"ups.{n}" for n, idx in enumerate(tail[:-2])})
    for idx, params in top.items():
        if idx not in names:
            raise ModelLoadError(f"unexpected ESRGAN layer model.{idx}")
        for kind, value in params.items():
            out[f"{names[idx]}.{kind}"] = value
    return out


def _canonical_from_new(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if m := _NEW_RDB.match(key):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif m := _NEW_UP.match(key):
            out[f"ups.{int(m.group(1)) - 1}.{m.group(2)}"] = value
        else:
            name, _, kind = key.rpartition(".")
            name = _NEW_RENAMES.get(name, name)
            if name not in ("conv_first", "conv_body", "conv_hr", "conv_last"):
                raise ModelLoadError(f"unexpected ESRGAN tensor '{key}'")
            out[f"{name}.{kind}"] = value
    return out


def is_rrdb(keys: set[str] | frozenset[str]) -> bool:
    old = "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys
    new = "conv_first.weight" in keys and (
        "body.0.rdb1.conv1.weight" in keys or "RRDB_trunk.0.RDB1.conv1.weight" in keys
    )
    return old or new


def canonical_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any of the three key layouts → this module's own layout."""
    if "model.0.weight" in sd:
        return _canonical_from_old(sd)
    return _canonical_from_new(sd)


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> RRDBConfig:
    """Sizes and scale read from a canonical state dict's shapes."""
    try:
        first = sd["conv_first.weight"]
        last = sd["conv_last.weight"]
        growth = sd["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as exc:
        raise ModelLoadError(f"ESRGAN state dict lacks {exc.args[0]}") from None
    num_blocks = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    num_ups = len({k.split(".")[1] for k in sd if k.startswith("ups.")})
    in_ch, out_ch = first.shape[1], last.shape[0]
    ratio = in_ch // out_ch if out_ch and in_ch % out_ch == 0 else 0
    unshuffle = {1: 1, 4: 2, 16: 4}.get(ratio)
    if unshuffle is None:
        raise ModelLoadError(f"ESRGAN with {in_ch} input and {out_ch} output channels is not a known variant")
    if 2**num_ups < unshuffle:
        raise ModelLoadError("ESRGAN downscales: more pixel unshuffle than upsampling")
    return RRDBConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        num_feat=first.shape[0],
        num_blocks=num_blocks,
        growth=growth,
        num_upsamples=num_ups,
        unshuffle=unshuffle,
    )


def build_rrdbnet(sd: Mapping[str, torch.Tensor]) -> RRDBNet:
    """A ready (eval mode, CPU) RRDBNet with every tensor of `sd` loaded; mismatches raise ModelLoadError."""
    canonical = canonical_state_dict(sd)
    net = RRDBNet(config_from_state_dict(canonical))
    try:
        net.load_state_dict(canonical, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"ESRGAN weights don't fit the detected architecture: {exc}") from None
    return net.eval()
