"""sha256 of checkpoint files, with A1111's on-disk cache so a restart doesn't rehash multi-GB files.

The cache file has A1111's layout: `{"hashes": {"checkpoint/<name>": {"mtime": <float>, "sha256": <hex>}}}`;
other sections of the file are kept as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

_CHUNK = 1024 * 1024
_SECTION = "hashes"


def sha256_file(path: Path, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, streamed in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def legacy_hash(path: Path) -> str | None:
    """A1111's old 8-digit "model hash": sha256 of the 64 KiB at offset 1 MiB (cheap, collision-prone).
    None for files too small to have data there: every such file would share one hash."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        block = f.read(0x10000)
    return hashlib.sha256(block).hexdigest()[:8] if block else None


class HashCache:
    """A JSON file of sha256 values keyed by a title such as "checkpoint/model.safetensors".

    An entry is valid while the file's mtime is the one recorded with it. The file is read lazily and
    rewritten atomically after each new entry.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            self._data = data if isinstance(data, dict) else {}
        section = self._data.get(_SECTION)
        if not isinstance(section, dict):
            self._data[_SECTION] = {}
        return self._data

    def get(self, key: str, mtime: float) -> str | None:
        with self._lock:
            entry = self._load()[_SECTION].get(key)
        if not isinstance(entry, dict) or entry.get("mtime") != mtime:
            return None
        value = entry.get("sha256")
        return value if isinstance(value, str) and len(value) == 64 else None

    def put(self, key: str, mtime: float, sha256: str) -> None:
        with self._lock:
            data = self._load()
            data[_SECTION][key] = {"mtime": mtime, "sha256": sha256}
            self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cache-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=4)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def cached_sha256(path: Path, key: str, cache: HashCache | None, *, compute: bool = True) -> str | None:
    """The file's sha256 from the cache, else computed (and cached) when `compute` is set, else None."""
    mtime = os.path.getmtime(path)
    if cache is not None and (hit := cache.get(key, mtime)) is not None:
        return hit
    if not compute:
        return None
    value = sha256_file(path)
    if cache is not None:
        cache.put(key, mtime, value)
    return value
