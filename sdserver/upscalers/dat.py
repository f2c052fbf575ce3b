"""DAT, the Dual Aggregation Transformer super-resolution network, built from a state dict.

Architecture after Chen et al., "Dual Aggregation Transformer for Image Super-Resolution" (ICCV 2023), original
code at github.com/zhengchen1999/DAT (Apache-2.0); hyperparameter inference follows chaiNNer-org/spandrel (MIT).
Written for sdserver from those descriptions.

Like SwinIR (conv, residual groups, conv, reconstruction head) but each group alternates two block kinds:
- spatial blocks (even index): half the channels attend in (h×w) windows, the other half in (w×h) windows, with a
  position bias produced by a small MLP from the relative offsets; some blocks shift their windows by half;
- channel blocks (odd index): attention across channels (transposed, L2-normalised, learned temperature).
Both mix their attention output with a depthwise-conv branch through channel and spatial gates, and feed a
spatial-gate FFN. Heads: 'pixelshuffle' (DAT, DAT-S, DAT-2) or 'pixelshuffledirect' (DAT-light).

The variants differ only in sizes the state dict shows: embed dim, blocks per group, heads, FFN expansion
(fc1 rows), window (split) size, and DAT-light's '3conv' residual convs and direct upsampler. The stored
`attn_mask_*` buffers depend on the training patch size and are ignored; spatial attention zero-pads its input
to whole windows itself, so any input size works.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sdserver.errors import ModelLoadError
from sdserver.upscalers.swinir import (
    PixelShuffleUpsample,
    build_loaded,
    direct_scale,
    image_mean,
    pixelshuffle_scale,
    relative_position_index,
    resi_connection_of,
    residual_conv,
    seq_len,
    shifted_window_mask,
    to_image,
    to_tokens,
    window_merge,
    window_partition,
    windowed_attention,
)


@dataclass(frozen=True)
class DATConfig:
    in_channels: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    split_size: tuple[int, int]  # spatial window (height, width) of the first branch; the second is transposed
    ffn_hidden: int
    qkv_bias: bool
    resi_connection: str  # "1conv" or "3conv"
    upsampler: str  # "pixelshuffle" or "pixelshuffledirect"
    scale: int
    num_feat: int


def is_shifted(group: int, block: int) -> bool:
    """Which spatial blocks use shifted windows: blocks 2, 6, 10… in even groups, 0, 4, 8… in odd ones."""
    if group % 2 == 0:
        return block > 0 and (block - 2) % 4 == 0
    return block % 4 == 0


def _mlp_step(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(cin), nn.ReLU(), nn.Linear(cin, cout))


class DynamicPosBias(nn.Module):
    """Relative position bias from an MLP over (dy, dx) offsets instead of a lookup table."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = _mlp_step(pos_dim, pos_dim)
        self.pos2 = _mlp_step(pos_dim, pos_dim)
        self.pos3 = _mlp_step(pos_dim, heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


def _offsets(wh: int, ww: int) -> torch.Tensor:
    """Every relative offset in a wh×ww window, ((2wh−1)(2ww−1), 2), dy-major."""
    grid = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
    return torch.stack(grid).flatten(1).transpose(0, 1).contiguous().float()


class WindowBranch(nn.Module):
    """Attention within wh×ww windows over one half of the channels."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int]) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.pos = DynamicPosBias(dim // 4, heads)
        self.register_buffer("rpe_biases", _offsets(*window))
        self.register_buffer("relative_position_index", relative_position_index(*window))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q, k, v: (B, H, W, C) with H, W whole windows; returns (B, H, W, C)."""
        b, h, w, c = q.shape
        wh, ww = self.window
        n = wh * ww

        def heads_of(t: torch.Tensor) -> torch.Tensor:
            return window_partition(t, wh, ww).view(-1, n, self.heads, c // self.heads).transpose(1, 2)

        bias = self.pos(self.rpe_biases)[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)
        out = windowed_attention(heads_of(q), heads_of(k), heads_of(v), bias)
        return window_merge(out.transpose(1, 2).reshape(-1, n, c), wh, ww, h, w)


class AdaptiveInteraction(nn.Module):
    """The conv branch and the two gates that exchange information between it and the attention output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())
        self.channel_interaction = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, dim // 8, 1),
            nn.BatchNorm2d(dim // 8),
            nn.GELU(),
            nn.Conv2d(dim // 8, dim, 1),
        )
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(), nn.Conv2d(dim // 16, 1, 1)
        )


class SpatialAttention(AdaptiveInteraction):
    """Dual-window spatial self-attention (the paper's DSTB attention)."""

    def __init__(self, config: DATConfig, heads: int, shifted: bool) -> None:
        dim = config.embed_dim
        super().__init__(dim)
        s0, s1 = config.split_size
        self.split, self.shifted = (s0, s1), shifted
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attns = nn.ModuleList(
            [WindowBranch(dim // 2, heads // 2, (s0, s1)), WindowBranch(dim // 2, heads // 2, (s1, s0))]
        )

    def _attend(self, qkv: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """qkv: (B, H', W', 3, C) zero-padded to whole windows → attention output (B, H·W, C)."""
        b, hp, wp, _, c = qkv.shape
        halves = []
        # Branch 0 takes the first half of the channels, branch 1 (transposed windows) the second.
        for branch, part in zip(self.attns, qkv.chunk(2, dim=-1)):
            win = branch.window
            shift = (win[0] // 2, win[1] // 2)
            mask = None
            if self.shifted:
                part = torch.roll(part, shifts=(-shift[0], -shift[1]), dims=(1, 2))
                mask = shifted_window_mask(hp, wp, win, shift, qkv.device)
            out = branch(part[..., 0, :], part[..., 1, :], part[..., 2, :], mask)
            if self.shifted:
                out = torch.roll(out, shifts=shift, dims=(1, 2))
            halves.append(out[:, :h, :w, :].reshape(b, h * w, c // 2))
        return torch.cat(halves, dim=2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        qkv = self.qkv(x)
        v = to_image(qkv[..., 2 * c :], h, w)
        step = max(self.split)
        # Pad after the projection, so padded tokens are exact zeros (the original's behaviour).
        padded = F.pad(to_image(qkv, h, w), (0, (-w) % step, 0, (-h) % step))
        attended = self._attend(padded.permute(0, 2, 3, 1).unflatten(-1, (3, c)), h, w)
        conv = self.dwconv(v)
        channel_gate = self.channel_interaction(conv).view(b, 1, c)
        spatial_gate = self.spatial_interaction(to_image(attended, h, w))
        attended = attended * torch.sigmoid(channel_gate)
        conv = to_tokens(torch.sigmoid(spatial_gate) * conv)
        return self.proj(attended + conv)


class ChannelAttention(AdaptiveInteraction):
    """Transposed (channel-to-channel) self-attention (the paper's DCTB attention)."""

    def __init__(self, config: DATConfig, heads: int) -> None:
        dim = config.embed_dim
        super().__init__(dim)
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)  # 3,B,heads,d,N
        conv = self.dwconv(v.reshape(b, c, h, w))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        attended = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        channel_gate = self.channel_interaction(to_image(attended, h, w))
        spatial_gate = to_tokens(self.spatial_interaction(conv))
        attended = attended * torch.sigmoid(spatial_gate)
        conv = to_tokens(conv * torch.sigmoid(channel_gate))
        return self.proj(attended + conv)


class SpatialGate(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * to_tokens(self.conv(to_image(self.norm(x2), h, w)))


class SGFN(nn.Module):
    """Spatial-gate feed-forward network."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.sg(F.gelu(self.fc1(x)), h, w))


class DATBlock(nn.Module):
    def __init__(self, config: DATConfig, heads: int, group: int, index: int) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn: nn.Module = (
            SpatialAttention(config, heads, is_shifted(group, index))
            if index % 2 == 0
            else ChannelAttention(config, heads)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = SGFN(dim, config.ffn_hidden)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class ResidualGroup(nn.Module):
    def __init__(self, config: DATConfig, group: int) -> None:
        super().__init__()
        heads = config.num_heads[group]
        self.blocks = nn.ModuleList(DATBlock(config, heads, group, i) for i in range(config.depths[group]))
        self.conv = residual_conv(config.embed_dim, config.resi_connection)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        y = x
        for block in self.blocks:
            y = block(y, h, w)
        return x + to_tokens(self.conv(to_image(y, h, w)))


class _Tokens(nn.Module):
    """(B, C, H, W) → (B, H·W, C); a parameterless first step so the LayerNorm after it is `before_RG.1`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(x)


class DAT(nn.Module):
    """The network. Input and output are images in [0, 1], (B, C, H, W); any H, W."""

    def __init__(self, config: DATConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        dim, nf, ch = config.embed_dim, config.num_feat, config.in_channels
        self.register_buffer("mean", image_mean(ch), persistent=False)
        self.conv_first = nn.Conv2d(ch, dim, 3, 1, 1)
        self.before_RG = nn.Sequential(_Tokens(), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(ResidualGroup(config, i) for i in range(len(config.depths)))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, config.resi_connection)
        if config.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, 1, 1), nn.LeakyReLU())
            self.upsample: nn.Module = PixelShuffleUpsample(config.scale, nf)
            self.conv_last = nn.Conv2d(nf, ch, 3, 1, 1)
        else:
            self.upsample = nn.Sequential(nn.Conv2d(dim, config.scale**2 * ch, 3, 1, 1), nn.PixelShuffle(config.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mean = self.mean.to(x.dtype)
        first = self.conv_first(x - mean)  # img_range is 1 for every DAT release
        tokens = self.before_RG(first)
        for layer in self.layers:
            tokens = layer(tokens, h, w)
        feat = self.conv_after_body(to_image(self.norm(tokens), h, w)) + first
        if self.config.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        else:
            out = self.upsample(feat)
        return out + mean


# -- inference from a state dict -------------------------------------------------------------------------------

_SKIP_KEYS = re.compile(r"\.attn_mask_[01]$")
_BRANCH0 = "layers.0.blocks.0.attn.attns.0"


def is_dat(keys: set[str] | frozenset[str]) -> bool:
    return "before_RG.1.weight" in keys or any(".attn.attns." in k for k in keys)


def _split_size_of(sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """The window size, from the largest stored offset (h−1, w−1) of the first branch; shapes alone can't tell
    8×32 from 32×8."""
    key = f"{_BRANCH0}.rpe_biases"
    if key not in sd:
        raise ModelLoadError(f"DAT state dict lacks {key}, the only record of the window (split) size")
    offsets = sd[key]
    if offsets.ndim != 2 or offsets.shape[1] != 2 or offsets.shape[0] == 0:
        raise ModelLoadError(f"DAT {key} has shape {tuple(offsets.shape)}: not (offsets, 2)")
    sh, sw = (int(round(float(v))) + 1 for v in offsets[-1])
    if sh < 1 or sw < 1 or offsets.shape[0] != (2 * sh - 1) * (2 * sw - 1):
        raise ModelLoadError(f"DAT {key} does not describe a window: last offset gives {sh}×{sw}")
    if max(sh, sw) % min(sh, sw):
        raise ModelLoadError(f"DAT window {sh}×{sw}: the longer side must be a multiple of the shorter")
    return sh, sw


def _heads_of(sd: Mapping[str, torch.Tensor], group: int, depth: int) -> int:
    if depth >= 2:
        key = f"layers.{group}.blocks.1.attn.temperature"
        if key in sd:
            return sd[key].shape[0]
    # Without a channel block only the spatial half-head count is stored: the total is twice it.
    key = f"layers.{group}.blocks.0.attn.attns.0.pos.pos3.2.weight"
    if key not in sd:
        raise ModelLoadError(f"DAT state dict lacks {key}")
    return sd[key].shape[0] * 2


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> DATConfig:
    """Every hyperparameter read from key names, tensor shapes and the stored window offsets."""
    try:
        first = sd["conv_first.weight"]
        fc1 = sd["layers.0.blocks.0.ffn.fc1.weight"]
    except KeyError as exc:
        raise ModelLoadError(f"DAT state dict lacks {exc.args[0]}") from None
    if first.ndim != 4 or fc1.ndim != 2:
        raise ModelLoadError("DAT conv_first / ffn.fc1 have the wrong rank")
    in_ch, dim = first.shape[1], first.shape[0]
    num_groups = seq_len(sd, "layers")
    depths = tuple(seq_len(sd, f"layers.{i}.blocks") for i in range(num_groups))
    if not depths or 0 in depths:
        raise ModelLoadError("DAT state dict has an empty residual group")
    heads = tuple(_heads_of(sd, i, d) for i, d in enumerate(depths))
    if any(h < 2 or h % 2 or (dim // 2) % (h // 2) for h in heads):
        raise ModelLoadError(f"DAT head counts {list(heads)} don't split embed dim {dim} into two halves")
    if "conv_last.weight" in sd:
        upsampler = "pixelshuffle"
        num_feat = sd["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in sd else 0
        if not num_feat:
            raise ModelLoadError("DAT state dict lacks conv_before_upsample.0.weight")
        scale = pixelshuffle_scale(sd, num_feat, "DAT")
    elif "upsample.0.weight" in sd:
        upsampler, num_feat = "pixelshuffledirect", dim
        scale = direct_scale(sd, in_ch, "DAT")
    else:
        raise ModelLoadError("DAT state dict has neither conv_last (pixelshuffle) nor upsample.0 (direct)")
    return DATConfig(
        in_channels=in_ch,
        embed_dim=dim,
        depths=depths,
        num_heads=heads,
        split_size=_split_size_of(sd),
        ffn_hidden=fc1.shape[0],
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd,
        resi_connection=resi_connection_of(sd, "conv_after_body"),
        upsampler=upsampler,
        scale=scale,
        num_feat=num_feat,
    )


def build_dat(sd: Mapping[str, torch.Tensor]) -> DAT:
    return build_loaded(DAT, config_from_state_dict(sd), sd, "DAT", _SKIP_KEYS)
