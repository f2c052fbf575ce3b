"""`NetworkLibrary`: the LoRA folders, their A1111 listing, name/alias lookup, short hashes and a bounded cache
of parsed network files.

Facts from A1111's `extensions-builtin/Lora/network.py` and `networks.py`: a network's name is its file's
basename without extension (subfolders don't count; a later file with the same name wins); its alias is the
safetensors metadata's `ss_output_name`, else the name; an alias shared by two files, and the alias "none",
can't be used (only the names can); metadata values that look like JSON objects are decoded and
`ssmd_cover_images` is dropped. The hash is the metadata's `sshs_model_hash` if present, else kohya's
"addnet" hash (sha256 of a safetensors file's bytes after its header, so editing metadata doesn't change it;
the whole file's sha256 for .pt/.ckpt); infotexts carry its first 12 hex digits.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from sdserver.errors import InvalidRequest, ModelLoadError
from sdserver.models.files import is_safetensors, load_state_dict, read_metadata
from sdserver.models.hashing import sha256_file
from sdserver.networks.lora_keys import TargetTable, build_target_table, split_key

NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")
SHORT_HASH_LENGTH = 12
# Sort order A1111 gives well-known kohya metadata keys; the rest keep file order after them.
_METADATA_ORDER = {"ss_sd_model_name": 1, "ss_resolution": 2, "ss_clip_skip": 3, "ss_num_train_images": 10, "ss_tag_frequency": 20}
_FORBIDDEN_ALIASES = frozenset({"none"})
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class NetworkFile:
    """A network file found on disk."""

    name: str
    path: Path
    alias: str
    metadata: Mapping[str, Any]
    mtime: float

    def listing(self) -> dict[str, Any]:
        """One item of A1111's `/sdapi/v1/loras`."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": dict(self.metadata)}


@dataclass(frozen=True)
class NetworkData:
    """A parsed network file: its tensors grouped by module key (`lora_unet_...`, `unet.down_blocks...`),
    each group keyed by tensor part (`lora_down.weight`, `alpha`, `hada_w1_a`, ...). Model-independent."""

    name: str
    path: Path
    mtime: float
    modules: Mapping[str, Mapping[str, torch.Tensor]]


def decode_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    """A1111's view of safetensors metadata: JSON-object strings decoded, cover images dropped, known keys first."""
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "ssmd_cover_images":
            continue
        decoded[key] = value
        if isinstance(value, str) and value.startswith("{"):
            try:
                decoded[key] = json.loads(value)
            except ValueError:
                pass
    return dict(sorted(decoded.items(), key=lambda item: _METADATA_ORDER.get(item[0], 999)))


def addnet_hash(path: Path) -> str:
    """kohya's hash of a safetensors file: sha256 of everything after the 8-byte length and the JSON header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_length)
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def network_sha256(path: Path, metadata: Mapping[str, Any]) -> str:
    """The full hash A1111 records for a network file (see the module docstring)."""
    stored = metadata.get("sshs_model_hash")
    if isinstance(stored, str) and stored:
        return stored
    return addnet_hash(path) if is_safetensors(path) else sha256_file(path)


def group_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module key: {part: tensor}}; `bundle_emb.*` (embeddings bundled into a LoRA) are left out."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, part = split_key(key)
        if module == "bundle_emb":
            continue
        modules.setdefault(module, {})[part] = tensor
    return modules


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for file in sorted(files):
            path = Path(root) / file
            if path.suffix.lower() in NETWORK_SUFFIXES:
                found.append(path)
    return found


def _read_entry(path: Path) -> NetworkFile:
    metadata = decode_metadata(read_metadata(path)) if is_safetensors(path) else {}
    name = path.stem
    alias = metadata.get("ss_output_name", name)
    return NetworkFile(name, path.resolve(), str(alias), MappingProxyType(metadata), path.stat().st_mtime)


@dataclass(frozen=True)
class _Index:
    by_name: Mapping[str, NetworkFile]
    by_alias: Mapping[str, NetworkFile]
    errors: Mapping[str, str]


def _index(folders: list[Path]) -> _Index:
    by_name: dict[str, NetworkFile] = {}
    alias_owners: dict[str, list[NetworkFile]] = {}
    errors: dict[str, str] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in _walk(folder):
            try:
                entry = _read_entry(path)
            except (OSError, ModelLoadError) as exc:
                errors[str(path)] = str(exc)
                continue
            by_name[entry.name] = entry
    for entry in by_name.values():
        alias_owners.setdefault(entry.alias, []).append(entry)
    by_alias = {
        alias: owners[0]
        for alias, owners in alias_owners.items()
        if len(owners) == 1 and alias.lower() not in _FORBIDDEN_ALIASES
    }
    return _Index(MappingProxyType(by_name), MappingProxyType(by_alias), MappingProxyType(errors))


class NetworkLibrary:
    """LoRA-family network files under `lora_dirs` (A1111: `models/Lora` or `--lora-dir`, plus `models/LyCORIS`).

    Listing and lookup may run on the HTTP thread while a worker loads, so state sits behind a lock that is
    never held while a tensor file is read. Parsed files are kept in an LRU of `cache_limit` entries.
    """

    def __init__(self, lora_dirs: list[Path], *, cache_limit: int = 4) -> None:
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.cache_limit = max(cache_limit, 0)
        self._lock = threading.Lock()
        self._index: _Index | None = None
        self._cache: OrderedDict[Path, NetworkData] = OrderedDict()
        self._hashes: dict[tuple[Path, float], str] = {}
        self._tables: weakref.WeakKeyDictionary[nn.Module, TargetTable] = weakref.WeakKeyDictionary()

    def refresh(self) -> None:
        """Rescan the folders (A1111's `/refresh-loras`)."""
        index = _index(self.lora_dirs)
        with self._lock:
            self._index = index

    def _current(self) -> _Index:
        with self._lock:
            index = self._index
        if index is None:
            self.refresh()
            with self._lock:
                index = self._index
        assert index is not None
        return index

    def list(self) -> list[dict[str, Any]]:
        """A1111's `/sdapi/v1/loras` body: `[{name, alias, path, metadata}]`, sorted by name."""
        index = self._current()
        return [index.by_name[name].listing() for name in sorted(index.by_name, key=str.lower)]

    @property
    def scan_errors(self) -> Mapping[str, str]:
        """Files the last scan couldn't read (path → reason)."""
        return self._current().errors

    def _lookup(self, name: str) -> NetworkFile | None:
        index = self._current()
        return index.by_name.get(name) or index.by_alias.get(name)

    def find(self, name: str, *, field: str = "prompt") -> NetworkFile:
        """The file a prompt's `<lora:NAME:...>` means: by file name, else by a unique alias.

        A1111 only logs an unknown name and generates without it; we refuse, so a typo doesn't silently give a
        different image. A miss rescans the folders once first (a file copied in since the last scan)."""
        entry = self._lookup(name)
        if entry is None:
            self.refresh()
            entry = self._lookup(name)
        if entry is None:
            raise InvalidRequest(f"LoRA not found: '{name}' (not a file name or alias in the LoRA folders)", field=field)
        return entry

    def hash(self, name: str) -> str:
        """The 12-hex short hash A1111 writes into `Lora hashes` (see the module docstring)."""
        return self.short_hash(self.find(name))

    def short_hash(self, entry: NetworkFile) -> str:
        return self.full_hash(entry)[:SHORT_HASH_LENGTH]

    def full_hash(self, entry: NetworkFile) -> str:
        key = (entry.path, entry.mtime)
        with self._lock:
            hit = self._hashes.get(key)
        if hit is not None:
            return hit
        value = network_sha256(entry.path, entry.metadata)
        with self._lock:
            self._hashes[key] = value
        return value

    def load(self, entry: NetworkFile) -> NetworkData:
        """The parsed file, from the cache unless it changed on disk since."""
        mtime = entry.path.stat().st_mtime
        with self._lock:
            cached = self._cache.get(entry.path)
            if cached is not None and cached.mtime == mtime:
                self._cache.move_to_end(entry.path)
                return cached
        try:
            tensors = load_state_dict(entry.path, device="cpu")
        except ModelLoadError as exc:
            raise InvalidRequest(f"LoRA '{entry.name}' can't be read: {exc.message}", field="prompt") from exc
        data = NetworkData(entry.name, entry.path, mtime, MappingProxyType(group_tensors(tensors)))
        with self._lock:
            self._cache[entry.path] = data
            self._cache.move_to_end(entry.path)
            while len(self._cache) > self.cache_limit:
                self._cache.popitem(last=False)
        return data

    def target_table(self, model: nn.Module) -> TargetTable:
        """The module lookup table of `model`, built once per model object."""
        with self._lock:
            table = self._tables.get(model)
        if table is None:
            table = build_target_table(model)
            with self._lock:
                self._tables[model] = table
        return table
