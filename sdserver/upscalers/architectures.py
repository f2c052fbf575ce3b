"""Which network a model file holds, judged from its state-dict keys, and building it.

ESRGAN (RRDBNet, all key layouts) and Real-ESRGAN compact (SRVGGNetCompact) are implemented. SwinIR and DAT
files are recognised so the error can say what they are, but refused: those transformer architectures are not
implemented in sdserver.
"""

from __future__ import annotations

import enum
from typing import Mapping

import torch
from torch import nn

from sdserver.errors import ModelLoadError, UnsupportedFeature
from sdserver.upscalers import compact, esrgan


class Architecture(enum.StrEnum):
    ESRGAN = "ESRGAN"
    COMPACT = "SRVGGNetCompact"
    SWINIR = "SwinIR"
    DAT = "DAT"


# BasicSR training checkpoints nest the weights; the EMA copy is the one released models are meant to use.
_NESTED_KEYS = ("params_ema", "params", "state_dict", "model")


def unwrap_state_dict(obj: Mapping[str, object]) -> dict[str, torch.Tensor]:
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return unwrap_state_dict(inner)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def detect(keys: set[str] | frozenset[str]) -> Architecture | None:
    if esrgan.is_rrdb(keys):
        return Architecture.ESRGAN
    if compact.is_compact(keys):
        return Architecture.COMPACT
    if any(".residual_group.blocks." in k for k in keys):
        return Architecture.SWINIR
    if "before_RG.1.weight" in keys or any(".attn.attns." in k for k in keys):
        return Architecture.DAT
    return None


def build(sd: Mapping[str, torch.Tensor], *, source: str, field: str) -> nn.Module:
    """The network for a state dict: an nn.Module in eval mode with an int `scale` attribute.

    `source` names the file in messages; `field` is the request field that chose it.
    """
    arch = detect(frozenset(sd))
    builders = {Architecture.ESRGAN: esrgan.build_rrdbnet, Architecture.COMPACT: compact.build_compact}
    if arch in builders:
        try:
            return builders[arch](sd)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{source}: {exc.message}", field=field) from None
    if arch in (Architecture.SWINIR, Architecture.DAT):
        raise UnsupportedFeature(
            f"{source} is a {arch} model; the {arch} architecture is not implemented in sdserver "
            "(ESRGAN and Real-ESRGAN models are)",
            field=field,
        )
    raise ModelLoadError(f"{source}: not a known upscaler architecture (ESRGAN, Real-ESRGAN compact)", field=field)
