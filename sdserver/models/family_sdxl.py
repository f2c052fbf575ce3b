"""SDXL base: UNet with vector conditioning (`label_emb`), KL VAE (scale 0.13025), two text encoders:
CLIP ViT-L in HF layout (`conditioner.embedders.0.transformer.text_model.*`) and OpenCLIP ViT-bigG/14 in its
original layout (`conditioner.embedders.1.model.*`) with a pooled projection."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import torch

from sdserver.errors import ModelLoadError
from sdserver.models import config_metadata as cm
from sdserver.models import shapes as derive
from sdserver.models.family_base import UNET, VAE, Family, ModelSpec, text_encoder_component
from sdserver.models.openclip import openclip_shapes_to_hf, openclip_to_hf
from sdserver.models.prediction import ZTSNR_MARKER, declared_prediction

CLIP_L = text_encoder_component(0)
CLIP_G = text_encoder_component(1)
_UNET_MARKER = "model.diffusion_model.label_emb.0.0.weight"
_CLIP_L_MARKER = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_CLIP_G_MARKER = "conditioner.embedders.1.model.token_embedding.weight"
HEAD_CHANNELS = 64
OPENCLIP_PAD = 0
SDXL_SCALING_FACTOR = 0.13025  # SDXL's VAE latent scale (sd_xl_base.yaml scale_factor)


class SDXLFamily(Family):
    name: ClassVar[str] = "sdxl"
    prefixes = (
        ("model.diffusion_model.", UNET),
        ("first_stage_model.", VAE),
        ("conditioner.embedders.0.transformer.text_model.", CLIP_L),
        ("conditioner.embedders.0.transformer.", CLIP_L),
        ("conditioner.embedders.1.model.", CLIP_G),
    )
    default_prefixes = MappingProxyType({
        UNET: "model.diffusion_model.",
        VAE: "first_stage_model.",
        CLIP_L: "conditioner.embedders.0.transformer.text_model.",
        CLIP_G: "conditioner.embedders.1.model.",
    })
    ignored_suffixes = ("embeddings.position_ids",)

    def matches(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return _UNET_MARKER in shapes and _CLIP_L_MARKER in shapes and _CLIP_G_MARKER in shapes

    def native_size(self, prediction_type: str) -> tuple[int, int]:
        return (1024, 1024)

    def convert(self, component: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return openclip_to_hf(tensors, keep_projection=True) if component == CLIP_G else tensors

    def convert_shapes(self, component: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return openclip_shapes_to_hf(shapes, keep_projection=True) if component == CLIP_G else shapes

    def spec(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelSpec:
        parts = self.split(shapes)
        doc = cm.parse_config_metadata(dict(metadata))
        unet = derive.unet_config(parts[UNET], num_heads=-1, num_head_channels=HEAD_CHANNELS)
        vae = dataclasses.replace(derive.vae_config(parts[VAE]), scaling_factor=SDXL_SCALING_FACTOR)
        clip_l = derive.clip_config(parts[CLIP_L])
        clip_g = derive.clip_config(self.convert_shapes(CLIP_G, dict(parts[CLIP_G])), activation="gelu",
                                    pad_token=OPENCLIP_PAD)
        encoders = doc.get("text_encoders") or [None, None]
        if not isinstance(encoders, list) or len(encoders) != 2:
            raise ModelLoadError(
                f"metadata '{cm.METADATA_KEY}.text_encoders' must list two encoders", field=cm.METADATA_KEY
            )
        prediction, source = declared_prediction(shapes, metadata) or ("eps", "default")
        return ModelSpec(
            family=self.name,
            unet=cm.apply_overrides(unet, doc.get("unet"), "unet"),
            vae=cm.apply_overrides(vae, doc.get("vae"), "vae"),
            text_encoders=(
                cm.apply_overrides(clip_l, encoders[0], "text_encoders[0]"),
                cm.apply_overrides(clip_g, encoders[1], "text_encoders[1]"),
            ),
            prediction_type=prediction,
            prediction_source=source,
            zero_terminal_snr=ZTSNR_MARKER in shapes,
            default_size=cm.default_size_of(doc, self.native_size(prediction)),
            uses_pooled=True,
            # SDXL conditions on both encoders' penultimate layers, un-normed, concatenated.
            final_layer_norm=False,
            fixed_text_layer=2,
        )
