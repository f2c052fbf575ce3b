"""Diffusers-format model folders → the original single-file checkpoint layout.

A diffusers folder holds `model_index.json` and one sub-folder per component (`unet/`, `vae/`, `text_encoder/`,
SDXL's `text_encoder_2/`), each with its weights (`diffusion_pytorch_model.safetensors` or `model.safetensors`)
and a `config.json`. The tensors are the same; only their names differ, so the folder is renamed into the layout
the families already read (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
`conditioner.embedders.*`) and loaded like any single file.

Mapping facts (block numbering, resnet and VAE attention names, OpenCLIP's fused q/k/v and transposed
projection) follow diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` and
`convert_diffusers_to_original_sdxl.py` (Apache-2.0), generalised here to any number of levels and resnets.
The same code renames bare shapes (as meta tensors), so detection reads no tensor data. SD 2.x folders keep
OpenCLIP-H without its last layer; see `with_identity_layer` for how they still condition as the original.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import torch

from sdserver.errors import ModelLoadError
from sdserver.models.openclip import hf_to_openclip

MODEL_INDEX = "model_index.json"
UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "vae", "text_encoder", "text_encoder_2"
REQUIRED = (UNET, VAE, TEXT_ENCODER)
# fp32 files first; a folder saved with `variant="fp16"` only has the second pair.
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
)
V = TypeVar("V")
_MODELSPEC_KEY = "modelspec.prediction_type"  # what `prediction.declared_prediction` reads

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET: Mapping[str, str] = MappingProxyType({
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
})
_UNET_TOP: Mapping[str, str] = MappingProxyType({
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
})
_VAE_RESNET: Mapping[str, str] = MappingProxyType({"conv_shortcut": "nin_shortcut"})
# Current diffusers names first, then the ones older diffusers releases saved.
_VAE_ATTENTION: Mapping[str, str] = MappingProxyType({
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
})
_VAE_CONV_1X1 = ("q", "k", "v", "proj_out")  # Linear in diffusers, 1x1 conv in the original VAE

_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def is_diffusers_folder(path: Path) -> bool:
    """Whether `path` is a diffusers pipeline folder (a `model_index.json` beside a `unet/` folder)."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_INDEX).is_file() and (path / UNET).is_dir()


def weight_files(folder: Path) -> dict[str, tuple[Path, ...]]:
    """{component: its weights files} of a diffusers folder (several when saved in shards, listed by a
    `<weights name>.index.json`); ModelLoadError naming what is missing."""
    folder = Path(folder)
    found: dict[str, tuple[Path, ...]] = {}
    for component in (*REQUIRED, TEXT_ENCODER_2):
        files = _component_files(folder / component)
        if files:
            found[component] = files
        elif component in REQUIRED:
            names = " or ".join(WEIGHT_NAMES[:2])
            raise ModelLoadError(f"{folder}: diffusers folder without {component}/{names}")
    return found


def _component_files(sub: Path) -> tuple[Path, ...]:
    for name in WEIGHT_NAMES:
        if (sub / name).is_file():
            return (sub / name,)
        index = sub / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{index}: no weight_map")
            shards = tuple(dict.fromkeys(sub / str(shard) for shard in weight_map.values()))
            missing = [p.name for p in shards if not p.is_file() or p.parent != sub]
            if missing:
                raise ModelLoadError(f"{index}: missing shards {missing}")
            return shards
    return ()


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def text_layout(folder: Path, components: Mapping[str, object]) -> str:
    """"sdxl" (two encoders), "openclip" (one OpenCLIP encoder: SD 2.x, whose HF config says gelu) or "clip"."""
    if TEXT_ENCODER_2 in components:
        return "sdxl"
    config = _read_json(Path(folder) / TEXT_ENCODER / "config.json")
    return "openclip" if config.get("hidden_act") == "gelu" else "clip"


def folder_metadata(folder: Path) -> dict[str, str]:
    """The facts a single file would carry as metadata: the scheduler's prediction type."""
    scheduler = _read_json(Path(folder) / "scheduler" / "scheduler_config.json")
    prediction = scheduler.get("prediction_type")
    return {_MODELSPEC_KEY: prediction} if isinstance(prediction, str) else {}


# ---- key renaming


def _resnet(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _indices(keys: list[str], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k)) is not None}


def unet_names(keys: list[str]) -> dict[str, str]:
    """{diffusers UNet key: original key (without prefix)}. Each level has `per_level` resnets going down and one
    more going up; an up level's upsampler follows its attention when the level has one."""
    per_level = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")) or 1
    up_with_attention = _indices(keys, r"up_blocks\.(\d+)\.attentions\.")
    mid_attention = any(k.startswith("mid_block.attentions.") for k in keys)
    names: dict[str, str] = {}
    for key in keys:
        names[key] = _unet_name(key, per_level, up_with_attention, mid_attention)
    return names


def _unet_name(key: str, per_level: int, up_with_attention: set[int], mid_attention: bool) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if (m := _BLOCK.fullmatch(key)) is not None:
        blocks, level, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if blocks == "down_blocks":
            first = 1 + level * (per_level + 1)
            if kind == "resnets":
                return f"input_blocks.{first + index}.0.{_resnet(rest, _RESNET)}"
            if kind == "attentions":
                return f"input_blocks.{first + index}.1.{rest}"
            return f"input_blocks.{first + per_level}.0.{rest.replace('conv.', 'op.', 1)}"
        first = level * (per_level + 1)
        if kind == "resnets":
            return f"output_blocks.{first + index}.0.{_resnet(rest, _RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{first + index}.1.{rest}"
        slot = 2 if level in up_with_attention else 1
        return f"output_blocks.{first + per_level}.{slot}.{rest}"
    if (m := _MID.fullmatch(key)) is not None:
        kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index if mid_attention else index}.{_resnet(rest, _RESNET)}"
    return key  # unknown names pass through and surface as "unexpected tensors"


def vae_names(keys: list[str]) -> dict[str, str]:
    """{diffusers VAE key: original key (without prefix)}; the decoder's levels are numbered in reverse."""
    levels = len(_indices(keys, r"decoder\.up_blocks\.(\d+)\.")) or len(_indices(keys, r"encoder\.down_blocks\.(\d+)\."))
    return {key: _vae_name(key, levels) for key in keys}


def _vae_name(key: str, levels: int) -> str:
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out{rest[len('conv_norm_out') :]}"
    if (m := _BLOCK.fullmatch(rest)) is not None:
        level, kind, index, tail = int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        number = level if m.group(1) == "down_blocks" else levels - 1 - level
        group = "down" if m.group(1) == "down_blocks" else "up"
        if kind == "resnets":
            return f"{part}.{group}.{number}.block.{index}.{_resnet(tail, _VAE_RESNET)}"
        if kind in ("downsamplers", "upsamplers"):
            return f"{part}.{group}.{number}.{'downsample' if group == 'down' else 'upsample'}.{tail}"
    if (m := _MID.fullmatch(rest)) is not None:
        kind, index, tail = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"{part}.mid.block_{index + 1}.{_resnet(tail, _VAE_RESNET)}"
        for old, new in _VAE_ATTENTION.items():
            if tail.startswith(old + "."):
                return f"{part}.mid.attn_1.{new}{tail[len(old) :]}"
    return key


def _vae_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    layer = name.rsplit(".", 2)
    if len(layer) == 3 and layer[0].endswith("mid.attn_1") and layer[1] in _VAE_CONV_1X1 and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def _strip_text_model(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers' CLIPTextModel nests everything but the projection under `text_model.`; the position ids
    # are a buffer the modules compute.
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith("embeddings.position_ids"):
            continue
        out[key[len("text_model.") :] if key.startswith("text_model.") else key] = value
    return out


def _openclip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    try:
        converted = hf_to_openclip(_strip_text_model(tensors))
    except KeyError as exc:
        raise ModelLoadError(f"unexpected text encoder tensor name {exc}") from None
    return {prefix + k: v for k, v in converted.items()}


_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def with_identity_layer(openclip: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text weights with one all-zero layer appended, which passes its input through unchanged
    (pre-norm residual blocks whose every weight is 0 add nothing).

    SD 2.x conditions on OpenCLIP-H's penultimate layer. Diffusers folders store the encoder without its last
    layer and condition on the final one; appending a pass-through layer makes the kept final layer the
    penultimate one again, so the SD 2.x family conditions on exactly what diffusers does."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in openclip.items():
        if (m := _RESBLOCK.fullmatch(key)) is not None:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        return dict(openclip)
    last = max(layers)
    out = dict(openclip)
    for name, value in layers[last].items():
        out[f"transformer.resblocks.{last + 1}.{name}"] = torch.zeros_like(value)
    return out


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def to_original(components: Mapping[str, Mapping[str, torch.Tensor]], layout: str) -> dict[str, torch.Tensor]:
    """One state dict in the original single-file layout from per-component diffusers state dicts. `layout` is
    `text_layout`'s answer: it decides where the text encoders go."""
    unet, vae = components[UNET], components[VAE]
    state = {UNET_PREFIX + new: unet[old] for old, new in unet_names(list(unet)).items()}
    state.update({VAE_PREFIX + new: _vae_tensor(new, vae[old]) for old, new in vae_names(list(vae)).items()})
    text = components[TEXT_ENCODER]
    if layout == "sdxl":
        state.update(_prefixed(text, "conditioner.embedders.0.transformer."))
        state.update(_openclip(components[TEXT_ENCODER_2], "conditioner.embedders.1.model."))
    elif layout == "openclip":
        state.update(_prefixed(with_identity_layer(_openclip(text, "")), "cond_stage_model.model."))
    else:
        state.update(_prefixed(text, "cond_stage_model.transformer."))
    return state


def _merged(parts: Iterable[Mapping[str, V]]) -> dict[str, V]:
    merged: dict[str, V] = {}
    for part in parts:
        merged.update(part)
    return merged


def original_state_dict(
    folder: Path, load: Callable[[Path], Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder under its original single-file name; `load` reads one weights file."""
    files = weight_files(folder)
    components = {name: _merged(load(path) for path in paths) for name, paths in files.items()}
    return to_original(components, text_layout(folder, files))


def original_shapes(
    folder: Path, read_shapes: Callable[[Path], Mapping[str, tuple[int, ...]]]
) -> dict[str, tuple[int, ...]]:
    """`original_state_dict`'s shapes, renamed through meta tensors so no data is read."""
    files = weight_files(folder)
    components = {
        name: {k: torch.empty(shape, device="meta") for k, shape in _merged(read_shapes(p) for p in paths).items()}
        for name, paths in files.items()
    }
    return {k: tuple(v.shape) for k, v in to_original(components, text_layout(folder, files)).items()}
