"""SwinIR, the Swin-Transformer image restoration network, built from a state dict.

Architecture after Liang et al., "SwinIR: Image Restoration Using Swin Transformer" (ICCVW 2021), original code at
github.com/JingyunLiang/SwinIR (Apache-2.0); the hyperparameter inference follows the rules chaiNNer-org/spandrel
(MIT) uses. Written for sdserver from those descriptions.

A shallow 3×3 conv, then residual groups ("RSTB") of Swin blocks — windowed multi-head self-attention with a
learned relative-position bias table, every second block on windows shifted by half a window — each group closed
by a conv and a skip, then one of four reconstruction heads:
- 'pixelshuffle' (classical SR): conv + LeakyReLU, pixel-shuffle steps, conv;
- 'pixelshuffledirect' (lightweight SR): one conv to out·scale² channels and one pixel shuffle;
- 'nearest+conv' (real-world SR, e.g. 003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN): nearest ×2 steps + convs;
- '' (denoising / JPEG artifact removal, scale 1): a conv added to the input.

Key names are those of the released checkpoints (`layers.N.residual_group.blocks.M.attn.relative_position_bias_table`,
`conv_after_body`, `upsample.0`, `conv_up1`, `patch_embed.norm`, ...). The stored `attn_mask` buffers depend on the
training patch size, so they are ignored and masks are computed for each input size. The window-attention helpers
here are shared with DAT (`sdserver.upscalers.dat`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from sdserver.errors import ModelLoadError

# The DIV2K mean both SwinIR and DAT subtract from RGB inputs (single-channel models subtract nothing).
_RGB_MEAN = (0.4488, 0.4371, 0.4040)
# Logit added between tokens from different regions of a shifted window: the value the originals use.
_MASK_VALUE = -100.0
_LRELU_SLOPE = 0.2
_NUM_FEAT_DEFAULT = 64

UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")


# -- helpers shared with DAT -----------------------------------------------------------------------------------


def image_mean(channels: int) -> torch.Tensor:
    if channels == 3:
        return torch.tensor(_RGB_MEAN).view(1, 3, 1, 1)
    return torch.zeros(1, 1, 1, 1)


def pad_symmetric(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right up to a multiple by mirroring (edge pixel repeated), as SwinIR's test script pads.

    Index arithmetic instead of F.pad(mode="reflect") so any pad works, even one wider than the image.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x

    def mirror(n: int, total: int) -> torch.Tensor:
        idx = torch.arange(total, device=x.device) % (2 * n)
        return torch.where(idx < n, idx, 2 * n - 1 - idx)

    return x.index_select(-2, mirror(h, h + ph)).index_select(-1, mirror(w, w + pw))


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, wh·ww, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_merge(windows: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """Inverse of window_partition: (B·nW, wh·ww, C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(
    h: int, w: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(nW, N, N) additive mask keeping attention inside the regions a cyclic shift glued together."""
    region = torch.zeros(1, h, w, 1, device=device)
    (wh, ww), (sh, sw) = window, shift
    label = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[:, hs, ws, :] = label
            label += 1
    labels = window_partition(region, wh, ww).squeeze(-1)
    diff = labels.unsqueeze(1) - labels.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, _MASK_VALUE)


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """(N, N) index into a (2wh-1)(2ww-1) table of relative offsets, N = wh·ww."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax(q·kᵀ/√d + bias)·v over (B·nW, heads, N, d); `bias` is (nW or 1, heads, N, N).

    The windows are viewed as (B, nW, ...) so the bias broadcasts over the batch instead of being copied.
    """
    shape = q.shape
    nw = bias.shape[0]
    q, k, v = (t.reshape(-1, nw, *t.shape[1:]) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    return out.reshape(shape)


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing a residual group: '1conv' a 3×3 conv; '3conv' a bottleneck of three convs."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1),
        nn.LeakyReLU(_LRELU_SLOPE),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
        nn.LeakyReLU(_LRELU_SLOPE),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


class PixelShuffleUpsample(nn.Sequential):
    """Convs at even indices, pixel shuffles at odd ones: log2(scale) ×2 steps, or one ×3 step."""

    def __init__(self, scale: int, num_feat: int) -> None:
        factors = [3] if scale == 3 else [2] * int(math.log2(scale))
        layers: list[nn.Module] = []
        for f in factors:
            layers += [nn.Conv2d(num_feat, f * f * num_feat, 3, 1, 1), nn.PixelShuffle(f)]
        super().__init__(*layers)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def to_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


def resi_connection_of(sd: Mapping[str, torch.Tensor], prefix: str) -> str:
    if f"{prefix}.weight" in sd:
        return "1conv"
    if f"{prefix}.4.weight" in sd:
        return "3conv"
    raise ModelLoadError(f"state dict has neither {prefix}.weight nor {prefix}.4.weight")


def seq_len(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children `prefix.N.` the keys have (highest N + 1)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def pixelshuffle_scale(sd: Mapping[str, torch.Tensor], num_feat: int, name: str) -> int:
    steps = seq_len(sd, "upsample")
    convs = [sd.get(f"upsample.{i}.weight") for i in range(0, steps, 2)]
    outs = [c.shape[0] for c in convs if c is not None]
    if len(outs) != len(convs) or not outs:
        raise ModelLoadError(f"{name} pixel-shuffle upsampler has missing convs")
    if outs == [9 * num_feat]:
        return 3
    if all(o == 4 * num_feat for o in outs):
        return 2 ** len(outs)
    raise ModelLoadError(f"{name} upsample convs emit {outs} channels: not 4·{num_feat} (×2) or 9·{num_feat} (×3)")


def direct_scale(sd: Mapping[str, torch.Tensor], out_ch: int, name: str) -> int:
    out = sd["upsample.0.weight"].shape[0]
    scale = math.isqrt(out // out_ch) if out % out_ch == 0 else 0
    if scale < 1 or scale * scale * out_ch != out:
        raise ModelLoadError(f"{name} upsample.0 emits {out} channels: not {out_ch}·scale²")
    return scale


def load_strict(net: nn.Module, sd: Mapping[str, torch.Tensor], name: str, skip: re.Pattern[str]) -> None:
    """Load `sd` into `net`, ignoring keys matching `skip`; buffers the file lacks keep the computed values."""
    tensors = {k: v for k, v in sd.items() if not skip.search(k)}
    buffers = {name for name, _ in net.named_buffers()}
    for key, value in net.state_dict().items():
        if key in buffers:
            tensors.setdefault(key, value)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{name} weights don't fit the detected architecture: {exc}") from None


# -- SwinIR ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwinIRConfig:
    in_channels: int
    out_channels: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_hidden: int
    qkv_bias: bool
    patch_norm: bool
    resi_connection: str  # "1conv" or "3conv"
    upsampler: str  # one of UPSAMPLERS
    scale: int
    num_feat: int  # channels of the reconstruction head
    img_range: float  # 255 for the JPEG models, else 1


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window, window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) or None."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)
        out = windowed_attention(q, k, v, bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """`mask`: the shifted-window mask for this size, used only if this block shifts."""
        h, w = size
        b, _, c = x.shape
        ws, s = self.window, self.shift
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws, ws), mask if s else None)
        y = window_merge(y, ws, ws, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, config: SwinIRConfig, depth: int, heads: int) -> None:
        super().__init__()
        ws = config.window_size
        self.window = ws
        self.blocks = nn.ModuleList(
            SwinBlock(config.embed_dim, heads, ws, 0 if i % 2 == 0 else ws // 2, config.mlp_hidden, config.qkv_bias)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        ws, s = self.window, self.window // 2
        mask = shifted_window_mask(*size, (ws, ws), (s, s), x.device) if s and len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, size, mask)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: a layer of Swin blocks, a conv, and a skip over both."""

    def __init__(self, config: SwinIRConfig, depth: int, heads: int) -> None:
        super().__init__()
        self.residual_group = BasicLayer(config, depth, heads)
        self.conv = residual_conv(config.embed_dim, config.resi_connection)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = to_image(self.residual_group(x, size), *size)
        return to_tokens(self.conv(y)) + x


class PatchEmbed(nn.Module):
    """Patch size 1: flatten to tokens, then (in every released model) a LayerNorm."""

    def __init__(self, dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        return self.norm(x) if self.norm is not None else x


class SwinIR(nn.Module):
    """The network. Input and output are images in [0, 1], (B, C, H, W); any H, W (padded to the window)."""

    def __init__(self, config: SwinIRConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        dim, nf = config.embed_dim, config.num_feat
        self.register_buffer("mean", image_mean(config.in_channels), persistent=False)
        self.conv_first = nn.Conv2d(config.in_channels, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, config.patch_norm)
        self.layers = nn.ModuleList(RSTB(config, d, h) for d, h in zip(config.depths, config.num_heads))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, config.resi_connection)
        up = config.upsampler
        if up in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, 1, 1), nn.LeakyReLU())
        if up == "pixelshuffle":
            self.upsample = PixelShuffleUpsample(config.scale, nf)
        elif up == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(dim, config.scale**2 * config.out_channels, 3, 1, 1), nn.PixelShuffle(config.scale)
            )
        elif up == "nearest+conv":
            # conv_up1, conv_up2, ...: one per nearest-neighbour ×2 step (the released models have two).
            for i in range(int(math.log2(config.scale))):
                self.add_module(f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
            self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        head_in = dim if up == "" else nf
        if up != "pixelshuffledirect":
            self.conv_last = nn.Conv2d(head_in, config.out_channels, 3, 1, 1)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3])
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, size)
        return to_image(self.norm(tokens), *size)

    def _reconstruct(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        up = self.config.upsampler
        if up == "pixelshuffle":
            return self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        if up == "pixelshuffledirect":
            return self.upsample(feat)
        if up == "nearest+conv":
            feat = self.conv_before_upsample(feat)
            for i in range(int(math.log2(self.scale))):
                conv = getattr(self, f"conv_up{i + 1}")
                feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), _LRELU_SLOPE)
            return self.conv_last(F.leaky_relu(self.conv_hr(feat), _LRELU_SLOPE))
        return x + self.conv_last(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_symmetric(x, self.config.window_size)
        mean, rng = self.mean.to(x.dtype), self.config.img_range
        x = (x - mean) * rng
        first = self.conv_first(x)
        feat = self.conv_after_body(self._features(first)) + first
        out = self._reconstruct(feat, x) / rng + mean
        return out[..., : h * self.scale, : w * self.scale]


# -- inference from a state dict -------------------------------------------------------------------------------

_BLOCK0 = "layers.0.residual_group.blocks.0"
# Buffers whose size depends on the training patch size; recomputed per input instead.
_SKIP_KEYS = re.compile(r"\.attn_mask$")


def is_swinir(keys: set[str] | frozenset[str]) -> bool:
    return any(".residual_group.blocks." in k for k in keys)


def _upsampler_of(sd: Mapping[str, torch.Tensor]) -> str:
    if "conv_before_upsample.0.weight" in sd:
        return "nearest+conv" if "conv_up1.weight" in sd else "pixelshuffle"
    if "upsample.0.weight" in sd:
        return "pixelshuffledirect"
    return ""


def _window_of(table: torch.Tensor) -> int:
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0] or side % 2 == 0:
        raise ModelLoadError(
            f"SwinIR relative_position_bias_table has {table.shape[0]} rows: not (2·window−1)²"
        )
    return (side + 1) // 2


def _scale_of(sd: Mapping[str, torch.Tensor], upsampler: str, num_feat: int, out_ch: int) -> int:
    if upsampler == "pixelshuffle":
        return pixelshuffle_scale(sd, num_feat, "SwinIR")
    if upsampler == "pixelshuffledirect":
        return direct_scale(sd, out_ch, "SwinIR")
    if upsampler == "nearest+conv":
        steps = len({k for k in sd if re.match(r"^conv_up\d+\.weight$", k)})
        if any(f"conv_up{i + 1}.weight" not in sd for i in range(steps)):
            raise ModelLoadError("SwinIR nearest+conv upsampler has a gap in its conv_upN layers")
        return 2**steps
    return 1


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> SwinIRConfig:
    """Every hyperparameter read from key names and tensor shapes."""
    if "absolute_pos_embed" in sd:
        raise ModelLoadError("SwinIR with an absolute position embedding (ape) is not supported")
    try:
        first = sd["conv_first.weight"]
        fc1 = sd[f"{_BLOCK0}.mlp.fc1.weight"]
        table = sd[f"{_BLOCK0}.attn.relative_position_bias_table"]
    except KeyError as exc:
        raise ModelLoadError(f"SwinIR state dict lacks {exc.args[0]}") from None
    if first.ndim != 4 or fc1.ndim != 2 or table.ndim != 2:
        raise ModelLoadError("SwinIR conv_first / mlp.fc1 / relative_position_bias_table have the wrong rank")
    in_ch, dim = first.shape[1], first.shape[0]
    num_layers = seq_len(sd, "layers")
    depths = tuple(seq_len(sd, f"layers.{i}.residual_group.blocks") for i in range(num_layers))
    heads = []
    for i in range(num_layers):
        key = f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"
        if key not in sd or depths[i] == 0:
            raise ModelLoadError(f"SwinIR state dict lacks {key}")
        heads.append(sd[key].shape[1])
    if any(dim % h for h in heads):
        raise ModelLoadError(f"SwinIR embed dim {dim} is not divisible by the head counts {heads}")
    upsampler = _upsampler_of(sd)
    out_ch = sd["conv_last.weight"].shape[0] if "conv_last.weight" in sd else in_ch
    num_feat = (
        sd["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in sd else _NUM_FEAT_DEFAULT
    )
    window = _window_of(table)
    return SwinIRConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        embed_dim=dim,
        depths=depths,
        num_heads=tuple(heads),
        window_size=window,
        mlp_hidden=fc1.shape[0],
        qkv_bias=f"{_BLOCK0}.attn.qkv.bias" in sd,
        patch_norm="patch_embed.norm.weight" in sd,
        resi_connection=resi_connection_of(sd, "conv_after_body"),
        upsampler=upsampler,
        scale=_scale_of(sd, upsampler, num_feat, out_ch),
        num_feat=num_feat,
        # The JPEG artifact models are the only released ones with 7×7 windows, and they work on 0..255.
        img_range=255.0 if window == 7 else 1.0,
    )


C = TypeVar("C")
N = TypeVar("N", bound=nn.Module)


def build_loaded(
    network: Callable[[C], N], config: C, sd: Mapping[str, torch.Tensor], name: str, skip: re.Pattern[str]
) -> N:
    """A ready (eval mode, CPU) network of `config` with every tensor of `sd` loaded; mismatches raise
    ModelLoadError."""
    try:
        net = network(config)
    except (RuntimeError, ValueError) as exc:  # sizes that pass the shape checks but still can't build layers
        raise ModelLoadError(f"{name} sizes {config} don't make a network: {exc}") from None
    load_strict(net, sd, name, skip)
    return net.eval()


def build_swinir(sd: Mapping[str, torch.Tensor]) -> SwinIR:
    return build_loaded(SwinIR, config_from_state_dict(sd), sd, "SwinIR", _SKIP_KEYS)
