"""One network module's weight delta for one target parameter: type detection, scale, shape fitting.

Facts from A1111's `network.py` (`NetworkModule.calc_scale`, `finalize_updown`) and `networks.py`
(`network_apply_weights`): the scale is a stored `scale` tensor if present, else `alpha / rank` when both are
known, else 1; a delta whose element count equals the target's is reshaped onto it; a delta for an inpainting
UNet's 9-channel conv_in trained on a 4-channel model is zero-padded on the input channels; a `diff_b` bias
delta is multiplied by the multiplier but not scaled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from sdserver.networks.lora import is_lora, lora_delta, lora_rank
from sdserver.networks.lycoris import (
    full_delta,
    is_full,
    is_loha,
    is_lokr,
    loha_delta,
    loha_rank,
    lokr_delta,
    lokr_rank,
)

Parts = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class NetworkType:
    name: str
    matches: Callable[[Parts], bool]
    rank: Callable[[Parts], int | None]
    delta: Callable[[Parts, torch.Size, int | None], torch.Tensor]


# A1111's detection order: the first type whose tensors are all present claims the module.
NETWORK_TYPES: tuple[NetworkType, ...] = (
    NetworkType("lora", is_lora, lora_rank, lambda p, shape, dyn: lora_delta(p, dyn)),
    NetworkType("loha", is_loha, loha_rank, lambda p, shape, dyn: loha_delta(p)),
    NetworkType("lokr", is_lokr, lokr_rank, lambda p, shape, dyn: lokr_delta(p, shape)),
    NetworkType("full", is_full, lambda p: None, lambda p, shape, dyn: full_delta(p)),
)

# Tensors of network types A1111 knows but we don't compute; named so the refusal says what the file is.
UNSUPPORTED_MARKERS: Mapping[str, str] = {
    "dora_scale": "DoRA",
    "weight": "IA3",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "a1.weight": "GLoRA",
    "w_norm": "norm",
}


def network_type(parts: Parts) -> NetworkType | None:
    for kind in NETWORK_TYPES:
        if kind.matches(parts):
            return kind
    return None


def unsupported_kind(parts: Parts) -> str | None:
    """The name of an unsupported network type these tensors belong to, if they mark one."""
    for marker, kind in UNSUPPORTED_MARKERS.items():
        if marker in parts:
            return kind
    return None


def scale_of(parts: Parts, rank: int | None) -> float:
    if "scale" in parts:
        return float(parts["scale"])
    if "alpha" in parts and rank:
        return float(parts["alpha"]) / rank
    return 1.0


class ShapeMismatch(ValueError):
    """A module's delta can't be laid onto its target (a LoRA trained for another architecture)."""


def fit(delta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`delta` in the target's `shape`: reshaped when the sizes agree, channel-padded for inpainting conv_in."""
    if delta.numel() == shape.numel():
        return delta.reshape(shape)
    if (
        len(shape) == 4
        and delta.dim() == 4
        and delta.shape[0] == shape[0]
        and delta.shape[2:] == shape[2:]
        and delta.shape[1] < shape[1]
    ):
        return F.pad(delta, (0, 0, 0, 0, 0, shape[1] - delta.shape[1]))
    raise ShapeMismatch(f"delta of shape {tuple(delta.shape)} doesn't fit a weight of shape {tuple(shape)}")


def module_delta(
    kind: NetworkType, parts: Parts, weight_shape: torch.Size, dyn: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scaled float32 weight delta in `weight_shape`, unscaled bias delta or None); multipliers not applied."""
    parts = {k: v.float() for k, v in parts.items()}
    scale = scale_of(parts, kind.rank(parts))
    weight = fit(kind.delta(parts, weight_shape, dyn), weight_shape) * scale
    bias = parts.get("diff_b")
    return weight, bias
