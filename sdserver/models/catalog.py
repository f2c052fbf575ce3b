"""Checkpoint files on disk and their A1111 identities (title, name, model_name, hashes) and aliases.

A1111's rules: `name` is the path relative to the checkpoint folder it was found in (just the file name for a
file given directly), `model_name` is `name` without extension with "/" and "\\" made "_", and `title` is
"name [first 10 hex of sha256]", or just `name` while unhashed. A checkpoint is found by any of its aliases.
A diffusers-format folder is listed as one checkpoint named after the folder (A1111 has no such thing; its
sha256 is that of its weight files' sha256 values, joined in component order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from sdserver.engine.types import CheckpointInfo
from sdserver.errors import ModelLoadError, ModelNotFound
from sdserver.models.diffusers_format import is_diffusers_folder, weight_files
from sdserver.models.files import CHECKPOINT_SUFFIXES
from sdserver.models.hashing import HashCache, cached_sha256, legacy_hash

SHORT_HASH_LEN = 10
# `<checkpoint>.vae.safetensors` beside a checkpoint is its VAE, not a checkpoint (A1111 leaves them out too).
_VAE_ENDINGS = (".vae.safetensors", ".vae.ckpt")


def cache_key(info: CheckpointInfo) -> str:
    return f"checkpoint/{info.name}"


def find_checkpoint_files(folder: Path) -> list[Path]:
    """Checkpoint files and diffusers folders under `folder`, recursively, in a stable order. The files inside
    a diffusers folder are its components, not checkpoints."""
    if not folder.is_dir():
        return []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        for name in list(dirnames):
            if is_diffusers_folder(here / name):
                found.append(here / name)
                dirnames.remove(name)
        found += [
            here / name
            for name in filenames
            if Path(name).suffix.lower() in CHECKPOINT_SUFFIXES and not name.lower().endswith(_VAE_ENDINGS)
        ]
    return sorted(found, key=lambda p: str(p.relative_to(folder)).lower())


def make_info(path: Path, root: Path | None, sha256: str | None = None) -> CheckpointInfo:
    """A1111's identity of `path`, found under folder `root` (None: a file named directly)."""
    path = Path(os.path.abspath(path))
    name = path.relative_to(os.path.abspath(root)).as_posix() if root is not None else path.name
    model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
    config = path.with_suffix(".yaml")
    short = sha256[:SHORT_HASH_LEN] if sha256 else None
    return CheckpointInfo(
        title=f"{name} [{short}]" if short else name,
        model_name=model_name,
        name=name,
        filename=str(path),
        hash=short,
        sha256=sha256,
        config=str(config) if config.is_file() else None,
    )


def with_sha256(info: CheckpointInfo, sha256: str) -> CheckpointInfo:
    short = sha256[:SHORT_HASH_LEN]
    return dataclasses.replace(info, sha256=sha256, hash=short, title=f"{info.name} [{short}]")


def hash_info(info: CheckpointInfo, cache: HashCache | None, *, compute: bool = True) -> CheckpointInfo:
    """`info` with its sha256 from the cache, or computed when `compute` is set."""
    path = Path(info.filename)
    if path.is_dir():
        sha = _folder_sha256(path, cache_key(info), cache, compute=compute)
    else:
        sha = cached_sha256(path, cache_key(info), cache, compute=compute)
    return with_sha256(info, sha) if sha else info


def _folder_sha256(folder: Path, key: str, cache: HashCache | None, *, compute: bool) -> str | None:
    """A diffusers folder's identity: the sha256 of its weight files' sha256 values, each cached as a file."""
    try:
        files = weight_files(folder)
    except ModelLoadError:
        return None  # listed unhashed; loading it reports what is missing
    parts = []
    for component, paths in files.items():
        for path in paths:
            sha = cached_sha256(path, f"{key}/{component}/{path.name}", cache, compute=compute)
            if sha is None:
                return None
            parts.append(sha)
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def scan(
    folders: Sequence[Path],
    extra_checkpoint: Path | None = None,
    cache: HashCache | None = None,
    *,
    compute_hashes: bool = True,
) -> list[CheckpointInfo]:
    """Every checkpoint in `folders` (recursive) plus `extra_checkpoint`, each file once, hashed from the cache
    and, when `compute_hashes`, by reading files the cache doesn't know."""
    seen: set[str] = set()
    infos: list[CheckpointInfo] = []
    candidates: list[tuple[Path, Path | None]] = []
    if extra_checkpoint is not None and (Path(extra_checkpoint).is_file() or is_diffusers_folder(extra_checkpoint)):
        extra = Path(extra_checkpoint)
        root = next((Path(f) for f in folders if _is_under(extra, Path(f))), None)
        candidates.append((extra, root))
    for folder in folders:
        candidates.extend((p, Path(folder)) for p in find_checkpoint_files(Path(folder)))
    for path, root in candidates:
        key = os.path.abspath(path)
        if key in seen:
            continue
        seen.add(key)
        infos.append(hash_info(make_info(path, root), cache, compute=compute_hashes))
    return infos


def _is_under(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return False
    return True


def aliases(info: CheckpointInfo) -> list[str]:
    """Every string that names `info`, A1111's set: title, name, model_name, the name without extension,
    the file's base name with and without extension, the short hash, the sha256 and the old 8-digit hash."""
    base = os.path.basename(info.name)
    names = [info.title, info.name, info.model_name, os.path.splitext(info.name)[0], base, os.path.splitext(base)[0]]
    if info.hash:
        names += [info.hash, f"{info.name} [{info.hash}]"]
    if info.sha256:
        names.append(info.sha256)
    try:
        old = legacy_hash(Path(info.filename))
    except OSError:
        old = None
    if old:
        names.append(old)
    return list(dict.fromkeys(names))


def alias_table(infos: Iterable[CheckpointInfo]) -> dict[str, CheckpointInfo]:
    """alias → checkpoint; where two checkpoints share an alias, the first listed keeps it."""
    table: dict[str, CheckpointInfo] = {}
    for info in infos:
        for alias in aliases(info):
            table.setdefault(alias, info)
    return table


def resolve(table: dict[str, CheckpointInfo], value: str) -> CheckpointInfo:
    """The checkpoint `value` names; a title with a stale " [hash]" still finds its file by name."""
    if value in table:
        return table[value]
    stripped = value.rsplit(" [", 1)[0] if value.endswith("]") else value
    if stripped in table:
        return table[stripped]
    raise ModelNotFound(f"checkpoint '{value}' not found", field="checkpoint")
