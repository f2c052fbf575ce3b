"""OpenCLIP text-transformer keys (SD 2.x `cond_stage_model.model.*`, SDXL `conditioner.embedders.1.model.*`)
↔ the Hugging Face CLIPTextModel layout of `sdserver.models.nn.clip`.

OpenCLIP fuses q/k/v into one `in_proj` and applies `text_projection` as `x @ P`; HF keeps q/k/v separate and
projects with a Linear whose weight is `P.T`. The same mapping serves tensors and bare shapes, so detection
works on stripped fixtures.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

import torch

V = TypeVar("V")

_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_PER_LAYER: Mapping[str, str] = MappingProxyType({
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
})
_FUSED: Mapping[str, str] = MappingProxyType({"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"})
_TOP: Mapping[str, str] = MappingProxyType({
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
})
# OpenCLIP's contrastive temperature; no use to a text encoder.
_DROPPED = ("logit_scale",)


def _convert(
    entries: Mapping[str, V],
    split3: Callable[[V], tuple[V, V, V]],
    transpose: Callable[[V], V],
    keep_projection: bool,
) -> dict[str, V]:
    out: dict[str, V] = {}
    for key, value in entries.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "text_projection":
            if keep_projection:
                out["text_projection.weight"] = transpose(value)
        elif key in _DROPPED:
            continue
        elif (m := _LAYER.fullmatch(key)) is not None:
            layer, rest = m.groups()
            base = f"encoder.layers.{layer}."
            if rest in _FUSED:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), split3(value)):
                    out[f"{base}self_attn.{name}.{_FUSED[rest]}"] = part
            else:
                # Unknown per-layer names pass through and surface as "unexpected tensors".
                out[base + _PER_LAYER.get(rest, rest)] = value
        else:
            out[key] = value
    return out


def _split3_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = t.chunk(3, dim=0)
    return q, k, v


def openclip_to_hf(tensors: Mapping[str, torch.Tensor], *, keep_projection: bool) -> dict[str, torch.Tensor]:
    return _convert(tensors, _split3_tensor, lambda t: t.T.contiguous(), keep_projection)


def _split3_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    part = (shape[0] // 3, *shape[1:])
    return part, part, part


def openclip_shapes_to_hf(
    shapes: Mapping[str, tuple[int, ...]], *, keep_projection: bool
) -> dict[str, tuple[int, ...]]:
    return _convert(shapes, _split3_shape, lambda s: tuple(reversed(s)), keep_projection)


def hf_to_openclip(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse, for building synthetic checkpoints in the original layout."""
    top = {v: k for k, v in _TOP.items()}
    per_layer = {v: k for k, v in _PER_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)) is not None:
            layer, rest = m.groups()
            if (q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)) is not None:
                fused.setdefault((layer, q.group(2)), {})[q.group(1)] = value
            else:
                out[f"transformer.resblocks.{layer}.{per_layer[rest]}"] = value
        else:
            out[key] = value
    for (layer, kind), parts in fused.items():
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{layer}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
