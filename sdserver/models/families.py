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
from sdserver.models.family_sdxl import SDXLFamily

# Markers are disjoint today (CLIP-L vs OpenCLIP text keys, label_emb), so the order only matters for families
# added later that extend one of these layouts.
REGISTRY: tuple[Family, ...] = (SDXLFamily(), SD2Family(), SD1Family())

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
    raise ModelLoadError(f"not a checkpoint of a known model family ({known}); its keys begin: {sample}")


def family_named(name: str, registry: Sequence[Family] = REGISTRY) -> Family:
    for family in registry:
        if family.name == name:
            return family
    raise ModelLoadError(f"unknown model family '{name}'; known: {[f.name for f in registry]}")
