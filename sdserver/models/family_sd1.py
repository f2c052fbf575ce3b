"""Stable Diffusion 1.x (and its 9-channel inpainting variant): LDM UNet, KL VAE, OpenAI CLIP ViT-L/14 text."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from sdserver.models import config_metadata as cm
from sdserver.models import shapes as derive
from sdserver.models.family_base import UNET, VAE, Family, ModelSpec, text_encoder_component
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdserver.models.prediction import ZTSNR_MARKER, declared_prediction

TEXT = text_encoder_component(0)
_UNET_MARKER = "model.diffusion_model.input_blocks.0.0.weight"
_TOKEN_EMBEDDING_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    # Some converters drop HF's `text_model.` level.
    "cond_stage_model.transformer.embeddings.token_embedding.weight",
)
# SD 1.x reads latent (4) channels, or latent + mask + masked-image latent (9) for inpainting.
_IN_CHANNELS = (4, 9)
SD1_NUM_HEADS = 8  # the SD 1.x rule (v1-inference.yaml num_heads: 8); not recoverable from shapes


def single_encoder_spec(
    family: Family, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], unet: UNetConfig,
    vae: VAEConfig, text: TextEncoderConfig, **extra: Any,
) -> ModelSpec:
    """The spec of a one-text-encoder family (SD 1.x, SD 2.x) from its shape-derived configs: the file's
    `sdserver.config` metadata overrides them, the prediction type is whatever the file declares."""
    doc = cm.parse_config_metadata(dict(metadata))
    prediction, source = declared_prediction(shapes, metadata) or ("eps", "default")
    return ModelSpec(
        family=family.name,
        unet=cm.apply_overrides(unet, doc.get("unet"), "unet"),
        vae=cm.apply_overrides(vae, doc.get("vae"), "vae"),
        text_encoders=(cm.apply_overrides(text, doc.get("text_encoder"), "text_encoder"),),
        prediction_type=prediction,
        prediction_source=source,
        zero_terminal_snr=ZTSNR_MARKER in shapes,
        default_size=cm.default_size_of(doc, family.native_size(prediction)),
        **extra,
    )


class SD1Family(Family):
    name: ClassVar[str] = "sd1"
    prefixes = (
        ("model.diffusion_model.", UNET),
        ("first_stage_model.", VAE),
        ("cond_stage_model.transformer.text_model.", TEXT),
        ("cond_stage_model.transformer.", TEXT),
    )
    default_prefixes = MappingProxyType({
        UNET: "model.diffusion_model.",
        VAE: "first_stage_model.",
        TEXT: "cond_stage_model.transformer.text_model.",
    })
    # A buffer of transformers' CLIPTextModel (0..76) that some checkpoints carry; positions are computed.
    ignored_suffixes = ("embeddings.position_ids",)

    def matches(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        conv_in = shapes.get(_UNET_MARKER)
        return (
            conv_in is not None
            and len(conv_in) == 4
            and conv_in[1] in _IN_CHANNELS
            and any(key in shapes for key in _TOKEN_EMBEDDING_KEYS)
            and "model.diffusion_model.label_emb.0.0.weight" not in shapes
        )

    def spec(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelSpec:
        parts = self.split(shapes)
        unet = derive.unet_config(parts[UNET], num_heads=SD1_NUM_HEADS)
        vae = derive.vae_config(parts[VAE])
        text = derive.clip_config(parts[TEXT])
        return single_encoder_spec(self, shapes, metadata, unet, vae, text)
