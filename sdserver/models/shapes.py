"""Architecture configs derived from tensor shapes, so non-standard widths and depths load.

Each function takes one component's `{key: shape}` with the checkpoint prefix already stripped (the
layouts of `sdserver.models.nn`) and returns that component's config. Head counts can't be derived; callers
pass their family's rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sdserver.errors import ModelLoadError
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig

Shapes = Mapping[str, tuple[int, ...]]


def shape_of(shapes: Shapes, key: str, component: str) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise ModelLoadError(f"checkpoint is missing the {component} tensor '{key}'") from None


def indices(shapes: Shapes, prefix: str) -> list[int]:
    """The sorted N of keys that start with `prefix` + "N."."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    return sorted(found)


def _first_with_suffix(shapes: Shapes, suffix: str) -> tuple[int, ...] | None:
    return next((shape for key, shape in shapes.items() if key.endswith(suffix)), None)


def unet_config(shapes: Shapes, *, num_heads: int = 8, num_head_channels: int = -1) -> UNetConfig:
    conv_in = shape_of(shapes, "input_blocks.0.0.weight", "UNet")
    model_channels, in_channels = conv_in[0], conv_in[1]
    levels: list[list[int]] = []  # per level: [channels, res blocks, transformer depth]
    current: list[int] | None = None
    for i in indices(shapes, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in shapes:
            if current is None:
                raise ModelLoadError(f"UNet input block {i} downsamples a level without res blocks")
            levels.append(current)
            current = None
            continue
        channels = shape_of(shapes, f"input_blocks.{i}.0.in_layers.2.weight", "UNet")[0]
        depth = len(indices(shapes, f"input_blocks.{i}.1.transformer_blocks."))
        if current is None:
            current = [channels, 0, depth]
        elif current[0] != channels or current[2] != depth:
            raise ModelLoadError(f"UNet input block {i}: widths or attention depths differ within one level")
        current[1] += 1
    if current is not None:
        levels.append(current)
    if not levels:
        raise ModelLoadError("UNet has no res blocks (no 'input_blocks.1.*' tensors)")
    res_counts = {level[1] for level in levels}
    if len(res_counts) != 1:
        raise ModelLoadError(f"UNet levels have different res block counts {sorted(res_counts)}")
    if any(level[0] % model_channels for level in levels):
        raise ModelLoadError("UNet level widths are not multiples of model_channels")
    proj_in = _first_with_suffix(shapes, "proj_in.weight")
    to_k = _first_with_suffix(shapes, "attn2.to_k.weight")
    label_emb = shapes.get("label_emb.0.0.weight")
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shape_of(shapes, "out.2.weight", "UNet")[0],
        model_channels=model_channels,
        channel_mult=tuple(level[0] // model_channels for level in levels),
        num_res_blocks=res_counts.pop(),
        transformer_depth=tuple(level[2] for level in levels),
        transformer_depth_middle=len(indices(shapes, "middle_block.1.transformer_blocks.")),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        context_dim=to_k[1] if to_k is not None else UNetConfig.context_dim,
        use_linear_in_transformer=proj_in is not None and len(proj_in) == 2,
        adm_in_channels=label_emb[1] if label_emb is not None else 0,
    )


def vae_config(shapes: Shapes) -> VAEConfig:
    conv_in = shape_of(shapes, "encoder.conv_in.weight", "VAE")
    base = conv_in[0]
    levels = indices(shapes, "encoder.down.")
    if not levels:
        raise ModelLoadError("VAE has no encoder levels (no 'encoder.down.0.*' tensors)")
    widths = [shape_of(shapes, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in levels]
    if any(w % base for w in widths):
        raise ModelLoadError("VAE level widths are not multiples of the base width")
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=shape_of(shapes, "decoder.conv_out.weight", "VAE")[0],
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=len(indices(shapes, "encoder.down.0.block.")),
        # The encoder outputs mean and log-variance, hence the halving.
        z_channels=shape_of(shapes, "encoder.conv_out.weight", "VAE")[0] // 2,
        embed_dim=shape_of(shapes, "quant_conv.weight", "VAE")[0] // 2,
        mid_attention="encoder.mid.attn_1.q.weight" in shapes,
    )


def clip_config(shapes: Shapes, *, activation: str = "quick_gelu", pad_token: int = 49407) -> TextEncoderConfig:
    """A HF-layout CLIP text encoder's config. Heads follow CLIP's 64 channels per head."""
    vocab, width = shape_of(shapes, "embeddings.token_embedding.weight", "text encoder")
    projection = shapes.get("text_projection.weight")
    return TextEncoderConfig(
        vocab_size=vocab,
        max_positions=shape_of(shapes, "embeddings.position_embedding.weight", "text encoder")[0],
        width=width,
        layers=len(indices(shapes, "encoder.layers.")),
        heads=max(1, width // 64),
        intermediate=shape_of(shapes, "encoder.layers.0.mlp.fc1.weight", "text encoder")[0],
        activation=activation,
        projection_dim=projection[0] if projection is not None else 0,
        pad_token=pad_token,
    )
