"""Separate VAE files (models/VAE, `<checkpoint>.vae.safetensors`) swapped into the loaded model per request.

The checkpoint's own VAE weights are kept on the CPU the first time another VAE replaces them, so "None"
(or a checkpoint switch) brings them back exactly.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdserver.errors import InvalidRequest, ModelLoadError
from sdserver.models.files import load_state_dict
from sdserver.models.hashing import sha256_file
from sdserver.models.sd_model import SDModel

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class VaeFile:
    name: str  # file name, A1111's `model_name`
    path: Path


def vae_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's own keys, whether the file is a bare VAE or carries the checkpoint prefix; training-only
    tensors (the loss network some VAE files keep) are dropped."""
    out = {}
    for key, value in raw.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            out[key] = value
    return out


def beside_checkpoint(checkpoint: Path) -> Path | None:
    """A1111's automatic VAE: `name.vae.safetensors` (or .pt/.ckpt) next to the checkpoint."""
    for suffix in VAE_SUFFIXES:
        candidate = checkpoint.with_name(checkpoint.stem + ".vae" + suffix)
        if candidate.is_file():
            return candidate
    return None


@dataclass
class VaeLibrary:
    dirs: list[Path]
    _files: list[VaeFile] | None = None
    # Keyed weakly by model, so an unloaded model's saved weights go with it.
    _originals: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _active: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _hashes: dict[Path, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self) -> None:
        found = sorted(
            (VaeFile(p.name, p.resolve()) for d in self.dirs if d.is_dir() for p in d.rglob("*")
             if p.suffix in VAE_SUFFIXES and p.is_file()),
            key=lambda f: f.name.lower(),
        )
        with self._lock:
            self._files = found

    def list(self) -> list[VaeFile]:
        if self._files is None:
            self.refresh()
        with self._lock:
            return list(self._files or [])

    def choose(self, choice: str | None, checkpoint: Path) -> Path | None:
        """The file a `sd_vae` value means: None/"Automatic" → beside the checkpoint or built in; "None" → built in."""
        if choice in (None, "", "Automatic"):
            return beside_checkpoint(checkpoint)
        if choice == "None":
            return None
        for f in self.list():
            if choice in (f.name, Path(f.name).stem, str(f.path)):
                return f.path
        names = ", ".join(["Automatic", "None", *(f.name for f in self.list())])
        raise InvalidRequest(f"VAE not found: '{choice}'; available: {names}", field="sd_vae")

    def apply(self, model: SDModel, path: Path | None) -> None:
        """Make `path`'s weights (None: the checkpoint's own) the model's VAE; a no-op when already active."""
        key = model
        if self._active.get(key, None) == path and key in self._active:
            return
        if key not in self._originals:
            self._originals[key] = {k: v.detach().to("cpu", copy=True) for k, v in model.vae.state_dict().items()}
        weights = self._originals[key] if path is None else vae_state_dict(load_state_dict(path))
        missing = set(model.vae.state_dict()) - set(weights)
        if missing:
            raise ModelLoadError(f"{path}: not a VAE for this model (missing {sorted(missing)[:3]})", field="sd_vae")
        try:
            model.vae.load_state_dict(_match_shapes(weights, model.vae.state_dict()), strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{path}: VAE doesn't fit this model: {exc}", field="sd_vae") from exc
        self._active[key] = path

    def short_hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = sha256_file(path)[:10]
        return self._hashes[path]


def _match_shapes(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention weights stored as Linear [C, C] where the module has 1x1 convs [C, C, 1, 1] (and back)."""
    out = {}
    for key, value in weights.items():
        want = target.get(key)
        if want is not None and value.shape != want.shape and value.numel() == want.numel():
            value = value.reshape(want.shape)
        out[key] = value
    return out
