"""Which network a model file holds, judged from its state-dict keys, and building it.

ESRGAN (RRDBNet, all key layouts), Real-ESRGAN compact (SRVGGNetCompact), SwinIR (classical, lightweight,
real-world and restoration heads) and DAT (DAT, DAT-S, DAT-2, DAT-light) are implemented; each builder infers its
hyperparameters from the state dict alone.
"""

from __future__ import annotations

import enum
from typing import Mapping

import torch
from torch import nn

from sdserver.errors import ModelLoadError
from sdserver.upscalers import compact, dat, esrgan, swinir


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
    if swinir.is_swinir(keys):
        return Architecture.SWINIR
    if dat.is_dat(keys):
        return Architecture.DAT
    return None


def build(sd: Mapping[str, torch.Tensor], *, source: str, field: str) -> nn.Module:
    """The network for a state dict: an nn.Module in eval mode with an int `scale` attribute.

    `source` names the file in messages; `field` is the request field that chose it.
    """
    arch = detect(frozenset(sd))
    builders = {
        Architecture.ESRGAN: esrgan.build_rrdbnet,
        Architecture.COMPACT: compact.build_compact,
        Architecture.SWINIR: swinir.build_swinir,
        Architecture.DAT: dat.build_dat,
    }
    if arch is None:
        known = ", ".join(a.value for a in Architecture)
        raise ModelLoadError(f"{source}: not a known upscaler architecture ({known})", field=field)
    try:
        net = builders[arch](sd)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{source}: {exc.message}", field=field) from None
    channels = net.config.in_channels if arch in (Architecture.SWINIR, Architecture.DAT) else 3
    if channels != 3:
        # Grayscale restoration models exist; images reach upscalers as RGB, so refuse at load, not mid-job.
        raise ModelLoadError(f"{source}: a {channels}-channel {arch} model; upscalers must take RGB images", field=field)
    return net
