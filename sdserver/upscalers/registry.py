"""The pixel upscalers a server offers: built-ins plus model files found in the model folders.

Names, order and listing fields follow A1111's `/sdapi/v1/upscalers`: "None", "Lanczos", "Nearest" first, then
model upscalers sorted by lower-cased name; a model file is named by its file stem, except the Real-ESRGAN release
files A1111 knows by a display name ("RealESRGAN_x4plus.pth" is "R-ESRGAN 4x+"). Nothing is downloaded: only
files already in the folders are listed.

Model files are read through `sdserver.models.files.load_state_dict`, which loads `.pth`/`.pt` pickles only
through a restricted unpickler. Loaded networks are cached per registry instance, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from torch import nn

from sdserver.errors import InvalidRequest, ModelLoadError
from sdserver.upscalers import architectures, builtin
from sdserver.upscalers.tiling import upscale_tiled

MODEL_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".safetensors")

# Folder kinds, as the keys of the `dirs` mapping (A1111's models/ subfolder names).
ESRGAN, REALESRGAN, SWINIR, DAT = "ESRGAN", "RealESRGAN", "SwinIR", "DAT"

# A1111's `model_name` per upscaler class; the others have none.
_MODEL_NAMES = {ESRGAN: "ESRGAN_4x", SWINIR: "SwinIR 4x"}
# The listing scale A1111 reports before any model is loaded (UpscalerData's default is 4; DAT files say None).
_LISTED_SCALE: dict[str, int | None] = {ESRGAN: 4, REALESRGAN: 4, SWINIR: 4, DAT: None}
# Real-ESRGAN release files (by stem) → A1111's display name and scale.
_REALESRGAN_RELEASES = {
    "realesr-general-x4v3": ("R-ESRGAN General 4xV3", 4),
    "realesr-general-wdn-x4v3": ("R-ESRGAN General WDN 4xV3", 4),
    "realesr-animevideov3": ("R-ESRGAN AnimeVideo", 4),
    "RealESRGAN_x4plus": ("R-ESRGAN 4x+", 4),
    "RealESRGAN_x4plus_anime_6B": ("R-ESRGAN 4x+ Anime6B", 4),
    "RealESRGAN_x2plus": ("R-ESRGAN 2x+", 2),
}
# A1111 runs a model upscaler at most this many times to reach a scale above the model's own.
_MAX_PASSES = 3

StateDictLoader = Callable[[Path], Mapping[str, Any]]


@dataclass(frozen=True)
class UpscalerInfo:
    """One `/upscalers` entry."""

    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None = None
    scale: float | None = 4


@dataclass(frozen=True)
class RealESRGANModel:
    """One `/realesrgan-models` entry."""

    name: str
    path: str
    scale: int


@dataclass(frozen=True)
class _Entry:
    info: UpscalerInfo
    kind: str  # "builtin" or a folder kind
    path: Path | None


def _default_loader(path: Path) -> Mapping[str, Any]:
    from sdserver.models.files import load_state_dict  # models is a sibling layer; import on first use only

    return load_state_dict(path)


def _entry_for_file(kind: str, path: Path) -> _Entry:
    name, scale = path.stem, _LISTED_SCALE.get(kind, 4)
    if kind == REALESRGAN and path.stem in _REALESRGAN_RELEASES:
        name, scale = _REALESRGAN_RELEASES[path.stem]
    info = UpscalerInfo(name=name, model_name=_MODEL_NAMES.get(kind), model_path=str(path), scale=scale)
    return _Entry(info=info, kind=kind, path=path)


def _scan(dirs: Mapping[str, Sequence[Path]]) -> tuple[_Entry, ...]:
    found: list[_Entry] = []
    for kind, folders in dirs.items():
        for folder in folders:
            folder = Path(folder)
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
                    found.append(_entry_for_file(kind, path.resolve()))
    builtins = tuple(
        _Entry(UpscalerInfo(name=n, model_name=None, model_path=None), "builtin", None) for n in builtin.BUILTIN_NAMES
    )
    return builtins + tuple(sorted(found, key=lambda e: e.info.name.lower()))


def _run_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    # Half-precision convolutions on CPU are slow or missing; CPU runs in float32.
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


class UpscalerRegistry:
    """Lists and runs pixel upscalers. `dirs` maps a folder kind ("ESRGAN", "RealESRGAN", "SwinIR", "DAT") to the
    folders scanned for it."""

    def __init__(
        self,
        dirs: Mapping[str, Sequence[Path]],
        *,
        max_loaded: int = 2,
        tile_size: int = 192,
        tile_pad: int = 16,
        loader: StateDictLoader | None = None,
    ) -> None:
        self._dirs = {kind: tuple(Path(p) for p in paths) for kind, paths in dirs.items()}
        self._max_loaded = max(1, max_loaded)
        self._tile_size = tile_size
        self._tile_pad = tile_pad
        self._loader = loader or _default_loader
        self._entries: tuple[_Entry, ...] | None = None
        self._models: OrderedDict[tuple[str, int, str, torch.dtype], nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    # -- listing -----------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rescan the folders. Cached networks of files that disappeared are dropped."""
        entries = _scan(self._dirs)
        paths = {str(e.path) for e in entries if e.path is not None}
        with self._lock:
            self._entries = entries
            for key in [k for k in self._models if k[0] not in paths]:
                del self._models[key]

    def _all(self) -> tuple[_Entry, ...]:
        if self._entries is None:
            self.refresh()
        assert self._entries is not None
        return self._entries

    def list(self) -> list[UpscalerInfo]:
        return [e.info for e in self._all()]

    def names(self) -> list[str]:
        return [e.info.name for e in self._all()]

    def realesrgan_models(self) -> list[RealESRGANModel]:
        return [
            RealESRGANModel(name=e.info.name, path=str(e.path), scale=int(e.info.scale or 4))
            for e in self._all()
            if e.kind == REALESRGAN
        ]

    def _find(self, name: str, field: str) -> _Entry:
        for entry in self._all():
            if entry.info.name == name:
                return entry
        allowed = ", ".join(self.names())
        raise InvalidRequest(f"unknown upscaler '{name}'; available: {allowed}", field=field)

    def has(self, name: str) -> bool:
        return any(e.info.name == name for e in self._all())

    # -- running -----------------------------------------------------------------------------------------------

    def clear_cache(self) -> None:
        with self._lock:
            self._models.clear()

    def _network(self, entry: _Entry, device: torch.device, dtype: torch.dtype, field: str) -> nn.Module:
        assert entry.path is not None
        try:
            # The modification time is in the key so a file replaced under the same name is loaded afresh.
            key = (str(entry.path), entry.path.stat().st_mtime_ns, str(device), dtype)
        except OSError as exc:
            raise ModelLoadError(f"{entry.path.name}: can't read upscaler model: {exc}", field=field) from None
        with self._lock:
            net = self._models.get(key)
            if net is not None:
                self._models.move_to_end(key)
                return net
            try:
                state = architectures.unwrap_state_dict(self._loader(entry.path))
            except ModelLoadError as exc:
                raise type(exc)(exc.message, field=field) from None
            net = architectures.build(state, source=entry.path.name, field=field)
            net = net.to(device=device, dtype=dtype)
            self._models[key] = net
            while len(self._models) > self._max_loaded:
                self._models.popitem(last=False)
            return net

    def upscale(
        self,
        image: Image.Image,
        scale: float,
        name: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        field: str = "upscaler",
        multiple: int = 1,
    ) -> Image.Image:
        """`image` upscaled by `name` to int(w·scale) × int(h·scale), each side then rounded down to `multiple`.

        A model runs at its own scale, repeatedly (up to three passes) while the image is still smaller than the
        target, and the result is Lanczos-resized to the exact size, as A1111 does. A1111's own Upscaler.upscale
        rounds down to multiples of 8: pass `multiple=8` where its output size must match (the extras route);
        img2img and hires resize to their exact size anyway. `field` names the request field, for errors.
        """
        entry = self._find(name, field)
        exact = int(image.width * scale), int(image.height * scale)
        target = (exact[0] // multiple * multiple, exact[1] // multiple * multiple) if multiple > 1 else exact
        if target[0] < 1 or target[1] < 1:
            raise InvalidRequest(
                f"upscaling {image.width}x{image.height} by {scale} gives an empty image", field=field
            )
        if entry.path is None:
            result = image.copy() if name == builtin.NONE else builtin.resize_builtin(image, *exact, name)
        else:
            result = self._run_model(entry, image.convert("RGB"), scale, target, device, dtype, field)
        if result.size != target:
            result = result.resize(target, resample=Image.Resampling.LANCZOS)
        return result

    def _run_model(
        self,
        entry: _Entry,
        image: Image.Image,
        scale: float,
        target: tuple[int, int],
        device: torch.device | str,
        dtype: torch.dtype,
        field: str,
    ) -> Image.Image:
        device = torch.device(device)
        run_dtype = _run_dtype(device, dtype)
        net = self._network(entry, device, run_dtype, field)
        for i in range(_MAX_PASSES):
            # A scale-1 request still runs the model once (a 1x model is a restorer); a downscale never does.
            if image.width >= target[0] and image.height >= target[1] and (i > 0 or scale != 1):
                break
            before = image.size
            image = upscale_tiled(net, image, device=device, dtype=run_dtype, tile=self._tile_size, pad=self._tile_pad)
            if image.size == before:
                break
        return image
