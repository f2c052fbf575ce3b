"""The family registry: which checkpoint layouts the server knows, tried in order.

A new family (SD 2.x, SDXL, ...) is a `Family` subclass in its own module, added to `REGISTRY` ahead of any
family whose markers it also carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sdserver.errors import ModelLoadError
from sdserver.models.family_base import Family, FamilyMatch, ModelSpec
from sdserver.models.family_sd1 import SD1Family
from sdserver.models.family_sd2 import SD2Family
from sdserver.models.family_sdxl import SDXLFamily, SDXLRefinerFamily

# Markers are disjoint today (CLIP-L vs OpenCLIP text keys, label_emb; the refiner's bigG is embedder 0 and it
# has no CLIP-L), so the order only matters for families added later that extend one of these layouts.
REGISTRY: tuple[Family, ...] = (SDXLFamily(), SDXLRefinerFamily(), SD2Family(), SD1Family())

__all__ = ["REGISTRY", "Family", "FamilyMatch", "ModelSpec", "detect", "family_named"]


def detect(
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    registry: Sequence[Family] = REGISTRY,
) -> FamilyMatch:
    """The first family that claims these shapes, with its derived spec; ModelLoadError when none does."""
    for family in registry:
        if family.matches(shapes):
            return FamilyMatch(family, family.spec(shapes, metadata or {}))
    known = ", ".join(f.name for f in registry)
    sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
    hint = describe_unknown(shapes)
    raise ModelLoadError(
        f"not a checkpoint of a known model family ({known}){': ' + hint if hint else ''}; its keys begin: {sample}"
    )


def describe_unknown(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What an unrecognised file most likely is, for the error message (users drop LoRAs and VAEs into the
    checkpoint folder)."""
    keys = list(shapes)
    if any(k.startswith(("lora_", "lycoris_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "it looks like a LoRA; put it into the Lora folder"
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.")) for k in keys):
        return "it looks like a VAE; put it into the VAE folder"
    if any(k.startswith(("down_blocks.", "unet.down_blocks.", "mid_block.")) for k in keys):
        return "it is in the diffusers layout; use a single-file checkpoint"
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] not in (4, 9):
        return f"its UNet takes {conv_in[1]} input channels (only 4, or 9 for inpainting, are supported)"
    if conv_in is None and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "it looks like an SDXL refiner's text encoder without its UNet"
    if conv_in is not None:
        return "it has a UNet but no known text encoder"
    return None


def family_named(name: str, registry: Sequence[Family] = REGISTRY) -> Family:
    for family in registry:
        if family.name == name:
            return family
    raise ModelLoadError(f"unknown model family '{name}'; known: {[f.name for f in registry]}")
