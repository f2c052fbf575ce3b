"""Separate VAE files (A1111's `sd_vae`): finding them, pairing them with checkpoints, loading them.

A1111's rules: VAE files are `.pt`, `.ckpt` and `.safetensors` in the VAE folder, plus `<name>.vae.<ext>` files in
the checkpoint folders. "Automatic" picks the `<checkpoint stem>.vae.<ext>` beside a checkpoint when there is one,
else the checkpoint's own VAE; "None" always the checkpoint's own. A VAE file holds the `first_stage_model` keys
without that prefix; training state (`loss.*`, `model_ema.*`) is ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdserver.errors import ModelLoadError
from sdserver.models import shapes as derive
from sdserver.models.build import check_component
from sdserver.models.family_base import Component
from sdserver.models.files import load_state_dict
from sdserver.models.nn.config import VAEConfig
from sdserver.models.nn.vae import AutoencoderKL

VAE_SUFFIXES = (".pt", ".ckpt", ".safetensors")
AUTOMATIC = "Automatic"
NONE = "None"
_STRIP_PREFIXES = ("first_stage_model.", "vae.")
_IGNORED_PREFIXES = ("loss.", "model_ema.")


@dataclass(frozen=True)
class VaeInfo:
    name: str  # the file name, A1111's `model_name` in /sd-vae and `VAE` in infotext
    filename: str  # absolute path
    hash: str | None = None  # first 10 hex digits of sha256, A1111's `VAE hash`
    sha256: str | None = None


def _is_vae_file(path: Path, *, in_checkpoint_dir: bool) -> bool:
    name = path.name.lower()
    if not path.is_file() or not name.endswith(VAE_SUFFIXES):
        return False
    return not in_checkpoint_dir or any(name.endswith(".vae" + s) for s in VAE_SUFFIXES)


def find_vae_files(vae_dirs: Sequence[Path], checkpoint_dirs: Sequence[Path] = ()) -> list[Path]:
    """VAE files in the VAE folders (any checkpoint suffix) and `*.vae.*` files in the checkpoint folders."""
    found: list[Path] = []
    for folders, in_checkpoint_dir in ((vae_dirs, False), (checkpoint_dirs, True)):
        for folder in folders:
            if Path(folder).is_dir():
                files = [p for p in Path(folder).rglob("*") if _is_vae_file(p, in_checkpoint_dir=in_checkpoint_dir)]
                found.extend(sorted(files, key=lambda p: p.name.lower()))
    return list(dict.fromkeys(p.resolve() for p in found))


def vae_beside(checkpoint: Path) -> Path | None:
    """The `<stem>.vae.<ext>` file next to a checkpoint, which "Automatic" prefers."""
    checkpoint = Path(checkpoint)
    for suffix in VAE_SUFFIXES:
        candidate = checkpoint.with_name(checkpoint.stem + ".vae" + suffix)
        if candidate.is_file():
            return candidate
    return None


def resolve_vae(choice: str | None, files: Sequence[Path], checkpoint: Path | None) -> Path | None:
    """The VAE file a choice means for a checkpoint; None means the checkpoint's own VAE."""
    if choice in (None, "", NONE):
        return None
    if choice == AUTOMATIC:
        return vae_beside(checkpoint) if checkpoint is not None else None
    for path in files:
        if choice in (path.name, path.stem, str(path)):
            return path
    names = [AUTOMATIC, NONE, *(p.name for p in files)]
    raise ModelLoadError(f"VAE '{choice}' not found; available: {names}", field="sd_vae")


def vae_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A VAE file's tensors in the AutoencoderKL layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in load_state_dict(path).items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if not key.startswith(_IGNORED_PREFIXES):
            out[key] = value
    return out


def load_vae(path: Path, like: VAEConfig, dtype: torch.dtype, device: torch.device | str) -> AutoencoderKL:
    """Build a VAE from a file. Its latent layout must match `like` (the checkpoint's VAE), whose scaling
    factor it keeps, as A1111 does."""
    tensors = vae_state_dict(path)
    try:
        cfg = dataclasses.replace(
            derive.vae_config({k: tuple(v.shape) for k, v in tensors.items()}), scaling_factor=like.scaling_factor
        )
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: not a VAE: {exc.message}", field="sd_vae") from exc
    if (cfg.embed_dim, cfg.downscale) != (like.embed_dim, like.downscale):
        raise ModelLoadError(
            f"{path}: VAE with {cfg.embed_dim} latent channels at 1/{cfg.downscale} scale doesn't fit a model "
            f"with {like.embed_dim} at 1/{like.downscale}",
            field="sd_vae",
        )
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    problems = check_component("vae", expected, Component("", tensors))
    if problems:
        raise ModelLoadError(f"{path}: " + "; ".join(problems), field="sd_vae")
    prepared = {
        k: v.reshape(expected[k]).to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in tensors.items()
    }
    vae.load_state_dict(prepared, strict=True, assign=True)
    return vae.eval().requires_grad_(False)
