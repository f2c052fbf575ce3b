"""Architecture configs of the Stable Diffusion components, in the original (LDM / CompVis) vocabulary.

A family (sdserver.models.families) derives these from a checkpoint's tensor shapes; the module classes in
this package take them and produce state dicts in the original single-file key layout, so a checkpoint loads
with a plain strict `load_state_dict` after the family's key mapping.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting checkpoints (latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer depth per resolution level (0: no attention there), and in the middle block.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    # Heads can't be read from tensor shapes: SD 1.x uses 8 heads, SD 2.x and SDXL 64 channels per head.
    num_heads: int = 8
    num_head_channels: int = -1  # > 0 overrides num_heads
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x / SDXL project with Linear, SD 1.x with 1x1 conv
    adm_in_channels: int = 0  # SDXL's vector conditioning (pooled text + size embeddings); 0 = none
    norm_groups: int = 32  # GroupNorm groups, 32 in every released model

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) for a transformer of `channels` width."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # len-1 downsamplings: 8x for four levels
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # SD 1.x/2.x latent scale; SDXL uses 0.13025
    mid_attention: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer (OpenAI CLIP-L in SD 1.x / SDXL, OpenCLIP ViT-H in SD 2.x, bigG in SDXL)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    activation: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP models use "gelu"
    projection_dim: int = 0  # > 0: a text_projection for the pooled output (SDXL bigG)
    pad_token: int = 49407  # CLIP-L pads with EOS; OpenCLIP pads with 0
