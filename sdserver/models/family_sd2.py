"""Stable Diffusion 2.x (512-base eps, 768-v, 9-channel inpainting): linear-projection UNet with 64-channel
heads, KL VAE, OpenCLIP ViT-H/14 text encoder in its original `cond_stage_model.model.*` layout."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import torch

from sdserver.models import shapes as derive
from sdserver.models.family_base import UNET, VAE, Family, ModelSpec, text_encoder_component
from sdserver.models.family_sd1 import single_encoder_spec
from sdserver.models.openclip import openclip_shapes_to_hf, openclip_to_hf

TEXT = text_encoder_component(0)
_UNET_MARKER = "model.diffusion_model.input_blocks.0.0.weight"
_TEXT_MARKER = "cond_stage_model.model.token_embedding.weight"
_IN_CHANNELS = (4, 9)
HEAD_CHANNELS = 64  # SD 2.x attention heads are 64 channels wide (v2-inference.yaml num_head_channels: 64)
OPENCLIP_PAD = 0  # open_clip's tokenizer pads with 0, not with EOS
# A norm bias whose spread separates SD 2.x v-models from eps ones in practice (a heuristic, logged when used).
_PROBE_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_PROBE_STD = 0.09


class SD2Family(Family):
    name: ClassVar[str] = "sd2"
    prefixes = (
        ("model.diffusion_model.", UNET),
        ("first_stage_model.", VAE),
        ("cond_stage_model.model.", TEXT),
    )
    default_prefixes = MappingProxyType(
        {UNET: "model.diffusion_model.", VAE: "first_stage_model.", TEXT: "cond_stage_model.model."}
    )

    def matches(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        conv_in = shapes.get(_UNET_MARKER)
        return (
            conv_in is not None
            and len(conv_in) == 4
            and conv_in[1] in _IN_CHANNELS
            and _TEXT_MARKER in shapes
            and "model.diffusion_model.label_emb.0.0.weight" not in shapes
        )

    def convert(self, component: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # SD 2.x conditions on the sequence only, so OpenCLIP's pooled projection is dropped.
        return openclip_to_hf(tensors, keep_projection=False) if component == TEXT else tensors

    def convert_shapes(self, component: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return openclip_shapes_to_hf(shapes, keep_projection=False) if component == TEXT else shapes

    def spec(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelSpec:
        parts = self.split(shapes)
        unet = derive.unet_config(parts[UNET], num_heads=-1, num_head_channels=HEAD_CHANNELS)
        vae = derive.vae_config(parts[VAE])
        text = derive.clip_config(
            self.convert_shapes(TEXT, dict(parts[TEXT])), activation="gelu", pad_token=OPENCLIP_PAD
        )
        # SD 2.x was trained on OpenCLIP's penultimate layer.
        return single_encoder_spec(self, shapes, metadata, unet, vae, text, fixed_text_layer=2)

    def native_size(self, prediction_type: str) -> tuple[int, int]:
        # The released v-models are the 768 ones, the eps ones 512 (base) — the shapes can't tell them apart.
        return (768, 768) if prediction_type == "v" else (512, 512)

    def guess_prediction(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        probe = state_dict.get(_PROBE_KEY)
        if probe is None or state_dict[_UNET_MARKER].shape[1] != 4:
            return None  # SD 2.x inpainting models are all eps
        return "v" if probe.float().std(unbiased=False).item() > _PROBE_STD else "eps"
