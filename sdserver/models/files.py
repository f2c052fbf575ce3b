"""Reading checkpoint files: tensor shapes, metadata and state dicts of `.safetensors` and `.ckpt` files.

Shapes come without reading tensor data (the safetensors JSON header; a `.ckpt` mapped onto the meta device),
so family detection is cheap even for multi-GB files. A diffusers-format folder reads as one checkpoint in the
original layout (see `diffusers_format`).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sdserver.errors import ModelLoadError, UnsafeCheckpoint
from sdserver.models import diffusers_format, unpickler

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# A real header is a few hundred KB; refuse absurd lengths before allocating them.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def is_safetensors(path: Path) -> bool:
    return Path(path).suffix.lower() == ".safetensors"


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelLoadError(f"{path}: not a safetensors file (truncated header)")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER_BYTES:
                raise ModelLoadError(f"{path}: not a safetensors file (header length {length})")
            raw = f.read(length)
    except OSError as exc:
        raise ModelLoadError(f"{path}: can't read checkpoint: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a safetensors file (bad header: {exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file (header is not an object)")
    return header


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    # Zip-format files are memory-mapped onto the CPU, so a multi-GB .ckpt isn't held twice while it's built.
    mmap = zipfile.is_zipfile(path) and torch.device(map_location).type == "cpu"
    try:
        return torch.load(path, map_location=map_location, pickle_module=unpickler, weights_only=False, mmap=mmap)
    except UnsafeCheckpoint as exc:
        raise UnsafeCheckpoint(f"{path}: {exc.message}") from None
    except ModelLoadError:
        raise
    except Exception as exc:  # torch raises many types for corrupt files; all mean "can't load"
        raise ModelLoadError(f"{path}: can't read checkpoint: {exc}") from exc


# Dicts that training code wraps weights in: LDM/Lightning "state_dict", BasicSR "params_ema" (the EMA weights,
# which its releases are meant to be used with) before "params", and "model".
_WRAPPER_KEYS = ("state_dict", "params_ema", "params", "model")


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor entries of a loaded pickle, unwrapped from a training framework's container dict."""
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} without reading tensor data."""
    path = Path(path)
    if path.is_dir():
        return diffusers_format.original_shapes(path, read_shapes)
    if is_safetensors(path):
        header = _read_safetensors_header(path)
        shapes: dict[str, tuple[int, ...]] = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
                raise ModelLoadError(f"{path}: bad safetensors header entry for '{key}'")
            shapes[key] = tuple(int(d) for d in entry["shape"])
        return shapes
    # The zip format can be mapped onto the meta device (no data read); the legacy format has to be loaded.
    location = "meta" if zipfile.is_zipfile(path) else "cpu"
    return {k: tuple(v.shape) for k, v in _tensors_of(_torch_load(path, location), path).items()}


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's `__metadata__` (string → string); `.ckpt` files have none."""
    path = Path(path)
    if path.is_dir():
        return diffusers_format.folder_metadata(path)
    if not is_safetensors(path):
        return {}
    meta = _read_safetensors_header(path).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: bad safetensors __metadata__")
    return {str(k): str(v) for k, v in meta.items()}


def load_state_dict(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in its stored dtype, on `device`."""
    path = Path(path)
    if path.is_dir():
        return diffusers_format.original_state_dict(path, lambda p: load_state_dict(p, device))
    if is_safetensors(path):
        try:
            return load_file(str(path), device=str(device))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{path}: can't read checkpoint: {exc}") from exc
    return _tensors_of(_torch_load(path, device), path)
