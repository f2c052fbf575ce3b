"""`ModelManager`: the one owner of checkpoint listings and loaded models.

Loading runs on the caller's thread (the engine's worker); listings may be read from the HTTP thread, so all
state sits behind a lock that is never held while a file is read. Models are kept in an LRU of `limit`
entries. A load is validated against the file's shapes before any tensor is read, and the previous model
stays current until the new one is fully built, so a failed load changes nothing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdserver.engine.types import CheckpointInfo
from sdserver.errors import InvalidRequest, ModelLoadError, NoModelAvailable
from sdserver.models import catalog
from sdserver.models.hashing import HashCache, cached_sha256
from sdserver.models.loader import free_memory, load_checkpoint, validate_file
from sdserver.models.nn.vae import AutoencoderKL
from sdserver.models.sd_model import SDModel
from sdserver.models.tokenizer import CLIPTokenizer
from sdserver.models.vae_files import AUTOMATIC, NONE, VaeInfo, find_vae_files, load_vae, resolve_vae

# Re-exported: callers load single files and free memory through the manager's module too.
__all__ = ["ModelManager", "free_memory", "load_checkpoint", "release_memory", "validate_file"]


def _trim_malloc() -> None:
    """Give freed heap pages back to the OS. glibc keeps large freed arenas mapped, so without this a process
    that dropped a multi-GB model still shows it resident; C libraries without `malloc_trim` are skipped."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the symbols already loaded into the process: its C library's
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def release_memory() -> None:
    """After models are dropped: collect garbage, empty the accelerator cache and return heap pages to the OS."""
    free_memory()
    _trim_malloc()


@dataclass(frozen=True)
class _Entry:
    info: CheckpointInfo
    model: SDModel
    own_vae: AutoencoderKL  # the checkpoint's VAE, put back when the choice returns to it
    vae: VaeInfo | None = None  # the separate VAE file in use, if any


class ModelManager:
    """Scans checkpoint folders, loads, caches and unloads models. Nothing else holds "the current model".

    Hashes follow A1111: listings take sha256 values from the on-disk cache only, and a checkpoint is hashed
    (and cached) when it is first loaded, so a large library doesn't stall startup; `hash_on_scan` hashes
    every file while scanning instead, `hashing=False` never hashes (A1111's --no-hashing). `vae_dirs` are
    the folders of separate VAE files (`set_vae`), `vae_dtype` the VAE's dtype when it differs from `dtype`
    (A1111's --no-half-vae); `prediction_overrides` maps checkpoint names to "eps"/"v". `vae_path` (A1111's
    --vae-path) is the VAE of every checkpoint, whatever `sd_vae` says. `storage_device` is where weights are
    built when it isn't `device` (system memory, for --medvram/--lowvram), and `prepare_model` is called with a
    model each time it becomes current or gets another VAE (the engine's offload hooks).
    """

    def __init__(
        self,
        checkpoint_dirs: list[Path],
        extra_checkpoint: Path | None,
        cache_path: Path,
        device: torch.device,
        dtype: torch.dtype,
        limit: int = 1,
        *,
        hash_on_scan: bool = False,
        hashing: bool = True,
        prediction_overrides: dict[str, str] | None = None,
        vae_dirs: list[Path] | None = None,
        vae_dtype: torch.dtype | None = None,
        vae_path: Path | None = None,
        storage_device: torch.device | None = None,
        prepare_model: Callable[[SDModel], None] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.checkpoint_dirs = [Path(d) for d in checkpoint_dirs]
        self.extra_checkpoint = Path(extra_checkpoint) if extra_checkpoint else None
        self.device = torch.device(device)
        self.dtype = dtype
        self.limit = limit
        # checkpoint name → "eps"/"v", for files that don't say and that no heuristic gets right.
        self.prediction_overrides = dict(prediction_overrides or {})
        self._hash_on_scan = hash_on_scan and hashing
        self._hashing = hashing
        self._cache = HashCache(cache_path)
        self._lock = threading.RLock()
        self._infos: list[CheckpointInfo] | None = None
        self._aliases: dict[str, CheckpointInfo] = {}
        self.vae_dirs = [Path(d) for d in vae_dirs or []]
        self.vae_dtype = vae_dtype or dtype
        self.vae_path = Path(vae_path) if vae_path is not None else None
        self.storage_device = torch.device(storage_device) if storage_device is not None else self.device
        self._prepare_model = prepare_model
        self._vae_choice = AUTOMATIC  # A1111's default `sd_vae`
        self._loaded: OrderedDict[str, _Entry] = OrderedDict()  # filename → entry
        self._current: str | None = None
        self._last: CheckpointInfo | None = None  # what `reload` brings back after `unload`
        self._tokenizer: CLIPTokenizer | None = None

    # listings

    def refresh(self) -> None:
        """Rescan the folders (hashing new files when hashing on scan)."""
        infos = catalog.scan(
            self.checkpoint_dirs, self.extra_checkpoint, self._cache, compute_hashes=self._hash_on_scan
        )
        table = catalog.alias_table(infos)
        with self._lock:
            self._infos, self._aliases = infos, table

    def checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            if self._infos is not None:
                return list(self._infos)
        self.refresh()
        with self._lock:
            return list(self._infos or [])

    def resolve(self, name: str) -> CheckpointInfo:
        """The checkpoint named by any A1111 alias; raises ModelNotFound naming `name`."""
        self.checkpoints()
        with self._lock:
            return catalog.resolve(self._aliases, name)

    def default_checkpoint(self) -> CheckpointInfo:
        """The checkpoint to load when none is chosen: the one given directly, else the first listed."""
        infos = self.checkpoints()
        if not infos:
            raise NoModelAvailable(self._no_model_message())
        if self.extra_checkpoint is not None:
            wanted = str(self.extra_checkpoint.resolve())
            return next((i for i in infos if str(Path(i.filename).resolve()) == wanted), infos[0])
        return infos[0]

    def _no_model_message(self) -> str:
        folders = ", ".join(str(d) for d in self.checkpoint_dirs) or "models/Stable-diffusion"
        return f"no checkpoint found: put a .safetensors or .ckpt Stable Diffusion checkpoint into {folders}"

    # loaded models

    @property
    def current(self) -> SDModel | None:
        with self._lock:
            entry = self._loaded.get(self._current) if self._current else None
            return entry.model if entry else None

    @property
    def current_info(self) -> CheckpointInfo | None:
        with self._lock:
            entry = self._loaded.get(self._current) if self._current else None
            return entry.info if entry else None

    def loaded(self) -> list[CheckpointInfo]:
        """Cached models, least recently used first."""
        with self._lock:
            return [entry.info for entry in self._loaded.values()]

    def ensure_loaded(self) -> SDModel:
        """The current model, loading the default checkpoint when none is loaded."""
        return self.current or self.load(self.default_checkpoint())

    def load(self, name_or_info: str | CheckpointInfo) -> SDModel:
        """Make a checkpoint current, from the cache or from disk. On failure the previous model stays current
        and ModelLoadError names the file."""
        if not self.checkpoints() and isinstance(name_or_info, str):
            raise NoModelAvailable(self._no_model_message())
        info = self.resolve(name_or_info) if isinstance(name_or_info, str) else name_or_info
        with self._lock:
            cached = self._loaded.get(info.filename)
        if cached is not None:
            self._install(self._apply_vae(cached))
            return cached.model
        model = self._read(info)
        if self._hashing and info.sha256 is None:
            info = self._hash(info)
        self._install(self._apply_vae(_Entry(info, model, model.vae)))
        return model

    def _install(self, entry: _Entry) -> None:
        filename = entry.info.filename
        with self._lock:
            self._loaded[filename] = entry
            self._loaded.move_to_end(filename)
            self._current = filename
            evicted = self._evict_beyond_limit()
        if evicted:
            release_memory()
        if self._prepare_model is not None:
            self._prepare_model(entry.model)

    def _evict_beyond_limit(self) -> bool:
        """Drop the least recently used models beyond `limit` (the current one is the most recent); under the lock."""
        evicted = False
        while len(self._loaded) > self.limit:
            self._loaded.popitem(last=False)
            evicted = True
        return evicted

    def set_limit(self, limit: int) -> None:
        """How many models stay loaded (A1111's `sd_checkpoints_limit`); lowering it evicts at once."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest(f"sd_checkpoints_limit must be an integer of at least 1, got {limit!r}",
                                 field="sd_checkpoints_limit")
        with self._lock:
            self.limit = limit
            evicted = self._evict_beyond_limit()
        if evicted:
            release_memory()

    def _read(self, info: CheckpointInfo) -> SDModel:
        path = Path(info.filename)
        try:
            config = Path(info.config) if info.config else None
            override = self.prediction_overrides.get(info.name)
            return load_checkpoint(
                path,
                self.dtype,
                self.storage_device,
                self._get_tokenizer(),
                config=config,
                prediction_type=override,
                vae_dtype=self.vae_dtype,
            )
        except ModelLoadError as exc:
            message = exc.message if str(path) in exc.message else f"{path}: {exc.message}"
            raise type(exc)(message, field=exc.field) from exc
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: can't load checkpoint: {exc}") from exc
        finally:
            # A failed build leaves large temporaries behind.
            gc.collect()

    def _hash(self, info: CheckpointInfo) -> CheckpointInfo:
        hashed = catalog.hash_info(info, self._cache)
        with self._lock:
            if self._infos is not None:
                self._infos = [hashed if i.filename == info.filename else i for i in self._infos]
                self._aliases = catalog.alias_table(self._infos)
        return hashed

    def _get_tokenizer(self) -> CLIPTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = CLIPTokenizer.load()
            return self._tokenizer

    def unload(self) -> None:
        """Drop every loaded model and free its memory; `reload` brings the current one back."""
        with self._lock:
            if self._current is not None and self._current in self._loaded:
                self._last = self._loaded[self._current].info
            self._loaded.clear()
            self._current = None
        release_memory()

    def reload(self) -> SDModel | None:
        """Re-read the current (or last unloaded) checkpoint from disk; None when there was none."""
        with self._lock:
            info = self._loaded[self._current].info if self._current in self._loaded else self._last
        if info is None:
            return None
        model = self._read(info)
        self._install(self._apply_vae(_Entry(info, model, model.vae)))
        return model

    # separate VAE files

    def vae_files(self) -> list[Path]:
        found = find_vae_files(self.vae_dirs, self.checkpoint_dirs)
        if self.vae_path is not None and self.vae_path.is_file():
            found = list(dict.fromkeys([*found, self.vae_path.resolve()]))
        return found

    def _vae_candidates(self, choice: str) -> list[Path]:
        # "Automatic" and "None" need no folder scan, which every cached-model switch would otherwise pay.
        return [] if choice in (AUTOMATIC, NONE) else self.vae_files()

    def _forced_vae(self) -> Path | None:
        if self.vae_path is None:
            return None
        if not self.vae_path.is_file():
            raise ModelLoadError(f"--vae-path {self.vae_path}: no such file", field="vae_path")
        return self.vae_path

    @property
    def vae_choice(self) -> str:
        return self._vae_choice

    @property
    def current_vae(self) -> VaeInfo | None:
        """The separate VAE file the current model uses; None when it uses its own."""
        with self._lock:
            entry = self._loaded.get(self._current) if self._current else None
            return entry.vae if entry else None

    def set_vae(self, choice: str | None) -> VaeInfo | None:
        """Choose the VAE as A1111's `sd_vae` does ("Automatic", "None" or a file name; None means
        "Automatic"), for the current model now and for models loaded later. A bad choice changes nothing."""
        choice = choice or AUTOMATIC
        with self._lock:
            entry = self._loaded.get(self._current) if self._current else None
        checkpoint = Path(entry.info.filename) if entry else None
        if self.vae_path is None:  # --vae-path overrides every choice, so none is refused (as A1111)
            resolve_vae(choice, self._vae_candidates(choice), checkpoint)  # validates the name even with no model
        if entry is not None:
            entry = self._apply_vae(entry, choice)
            with self._lock:
                if entry.info.filename in self._loaded:
                    self._loaded[entry.info.filename] = entry
            if self._prepare_model is not None:
                self._prepare_model(entry.model)
        self._vae_choice = choice
        return entry.vae if entry else None

    def _apply_vae(self, entry: _Entry, choice: str | None = None) -> _Entry:
        """`entry` with the chosen VAE in its model (loading a file when it differs from the one in use)."""
        choice = choice or self._vae_choice
        path = self._forced_vae() or resolve_vae(choice, self._vae_candidates(choice), Path(entry.info.filename))
        if path is None:
            entry.model.vae = entry.own_vae
            return dataclasses.replace(entry, vae=None)
        if entry.vae is not None and entry.vae.filename == str(path):
            return entry
        entry.model.vae = load_vae(path, entry.model.spec.vae, self.vae_dtype, self.storage_device)
        sha = cached_sha256(path, f"vae/{path.name}", self._cache) if self._hashing else None
        return dataclasses.replace(entry, vae=VaeInfo(path.name, str(path), sha[:10] if sha else None, sha))
