"""SDXL base: UNet with vector conditioning (`label_emb`), KL VAE (scale 0.13025), two text encoders:
CLIP ViT-L in HF layout (`conditioner.embedders.0.transformer.text_model.*`) and OpenCLIP ViT-bigG/14 in its
original layout (`conditioner.embedders.1.model.*`) with a pooled projection. A 9-channel UNet is SDXL
inpainting, through the same family.

SDXL refiner: the same UNet kind (model_channels 384, context 1280, ADM 2560) conditioned on bigG alone, which
sits at `conditioner.embedders.0.model.*`; its vector `y` ends in an aesthetic-score embedding
(sgm's sd_xl_refiner.yaml: pooled bigG, original size, crop, aesthetic score; 256 channels per number)."""

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
from sdserver.models.family_sd1 import single_encoder_spec
from sdserver.models.nn.layers import timestep_embedding
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
REFINER_FAMILY = "sdxl_refiner"
REFINER_TEXT = text_encoder_component(0)
_REFINER_G_MARKER = "conditioner.embedders.0.model.token_embedding.weight"
_SIZE_EMBED_DIM = 256  # per number of the refiner's vector, as the base's


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


class SDXLRefinerFamily(Family):
    """The SDXL refiner's single-file layout: bigG alone as embedder 0."""

    name: ClassVar[str] = REFINER_FAMILY
    prefixes = (
        ("model.diffusion_model.", UNET),
        ("first_stage_model.", VAE),
        ("conditioner.embedders.0.model.", REFINER_TEXT),
    )
    default_prefixes = MappingProxyType({
        UNET: "model.diffusion_model.",
        VAE: "first_stage_model.",
        REFINER_TEXT: "conditioner.embedders.0.model.",
    })

    def matches(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return _UNET_MARKER in shapes and _REFINER_G_MARKER in shapes and _CLIP_L_MARKER not in shapes

    def native_size(self, prediction_type: str) -> tuple[int, int]:
        return (1024, 1024)

    def convert(self, component: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return openclip_to_hf(tensors, keep_projection=True) if component == REFINER_TEXT else tensors

    def convert_shapes(self, component: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return openclip_shapes_to_hf(shapes, keep_projection=True) if component == REFINER_TEXT else shapes

    def spec(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelSpec:
        parts = self.split(shapes)
        unet = derive.unet_config(parts[UNET], num_heads=-1, num_head_channels=HEAD_CHANNELS)
        vae = dataclasses.replace(derive.vae_config(parts[VAE]), scaling_factor=SDXL_SCALING_FACTOR)
        text = derive.clip_config(self.convert_shapes(REFINER_TEXT, dict(parts[REFINER_TEXT])), activation="gelu",
                                  pad_token=OPENCLIP_PAD)
        # Penultimate bigG layer, un-normed, and the pooled projection: the base's bigG half.
        return single_encoder_spec(self, shapes, metadata, unet, vae, text, uses_pooled=True,
                                   final_layer_norm=False, fixed_text_layer=2)


def is_refiner(spec: ModelSpec) -> bool:
    """Whether a model takes the refiner's aesthetic-score vector rather than the base's target size."""
    return spec.family == REFINER_FAMILY


def refiner_vector(
    pooled: torch.Tensor, width: int, height: int, aesthetic_score: float, *, crop_top: int = 0, crop_left: int = 0
) -> torch.Tensor:
    """The refiner's `y`: pooled bigG ([P] or [B, P]) followed by sinusoidal embeddings of the original
    (height, width), the crop's (top, left) and the aesthetic score, in sgm's embedder order. float32, CPU."""
    numbers = torch.tensor([height, width, crop_top, crop_left, aesthetic_score], dtype=torch.float32)
    tail = timestep_embedding(numbers, _SIZE_EMBED_DIM).reshape(-1)
    pooled = pooled.detach().float().cpu()
    if pooled.ndim == 1:
        return torch.cat([pooled, tail])
    return torch.cat([pooled, tail.expand(pooled.shape[0], -1)], dim=1)
