"""Textual-inversion embeddings: the embeddings folder, A1111's /embeddings listing, and the pieces prompt
encoding needs (finding an embedding's name in a token list, splicing its vectors into the token embeddings).

Facts from A1111's `modules/textual_inversion/textual_inversion.py` (`create_embedding_from_data`,
`EmbeddingDatabase`): an embedding is named by its file's basename without extension; A1111/SD `.pt` files hold
`string_to_param` with exactly one tensor (plus `step`, `sd_checkpoint`, `sd_checkpoint_name`); SDXL files hold
`clip_l` and `clip_g` (shape = the sum of their widths); any other file must hold exactly one tensor (diffusers
`.bin` `{token: tensor}`, `.safetensors` `emb_params`), a 1-D one being a single vector. An embedding is usable
when its shape equals the model's token-embedding width (summed over text encoders), else it is "skipped";
loaded embeddings are listed sorted by lower-cased name. The hash is the whole file's sha256; infotexts carry
its first 12 hex digits (`TI hashes`). In a prompt, the longest embedding name whose tokens start at a
position wins.

`.pt`/`.bin` files go through the restricted unpickler: an old file that pickled `string_to_param` as a
`torch.nn.ParameterDict` is refused (listed in `errors`) rather than unpickled with arbitrary classes.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from sdserver.errors import ModelLoadError
from sdserver.models import unpickler
from sdserver.models.hashing import sha256_file
from sdserver.models.sd_model import repad

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SHORT_HASH_LENGTH = 12
_SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class Embedding:
    name: str
    path: Path
    # One [n, D] tensor per text encoder it serves: {"": t} for single-encoder files, {"clip_l", "clip_g"} SDXL.
    vectors: Mapping[str, torch.Tensor]
    shape: int  # A1111's "shape": the vector width (summed for SDXL)
    count: int  # vectors per use
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    def listing(self) -> dict[str, Any]:
        """One value of A1111's /embeddings `loaded` or `skipped` dict."""
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.count,
        }

    def vectors_for(self, width: int) -> torch.Tensor:
        """The [n, width] vectors for a text encoder of `width` (SDXL files carry one set per encoder)."""
        for tensor in self.vectors.values():
            if tensor.shape[-1] == width:
                return tensor
        raise ValueError(f"embedding {self.name!r} has no {width}-wide vectors")


def _restricted_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", pickle_module=unpickler, weights_only=False)
    except ModelLoadError:
        raise
    except Exception as exc:  # torch raises many types for corrupt files; all mean "can't load"
        raise ModelLoadError(f"{path}: can't read embedding: {exc}") from exc


def read_embedding_file(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{path}: can't read embedding: {exc}") from exc
    return _restricted_load(path)


def _optional_int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    return None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _as_matrix(tensor: Any, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise ModelLoadError(f"{path}: embedding vectors must be a 1-D or 2-D tensor")
    tensor = tensor.detach().to(torch.float32)
    return tensor[None] if tensor.dim() == 1 else tensor


def embedding_from_data(data: Any, name: str, path: Path) -> Embedding:
    """An Embedding from a loaded file's contents, recognised as A1111 does."""
    if not isinstance(data, dict) or not data:
        raise ModelLoadError(f"{path}: not an embedding file")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelLoadError(f"{path}: embedding file has multiple terms in it")
        tensor = _as_matrix(next(iter(params.values())), path)
        vectors: dict[str, torch.Tensor] = {"": tensor}
        shape, count = tensor.shape[-1], tensor.shape[0]
    elif all(key in data for key in _SDXL_KEYS):
        vectors = {key: _as_matrix(data[key], path) for key in _SDXL_KEYS}
        shape = sum(v.shape[-1] for v in vectors.values())
        count = vectors["clip_g"].shape[0]
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(data) != 1 or len(tensors) != 1:
            raise ModelLoadError(f"{path}: neither a textual inversion embedding nor a diffusers concept")
        tensor = _as_matrix(tensors[0], path)
        vectors, shape, count = {"": tensor}, tensor.shape[-1], tensor.shape[0]
    return Embedding(
        name=name,
        path=path,
        vectors=MappingProxyType(vectors),
        shape=int(shape),
        count=int(count),
        step=_optional_int(data.get("step")),
        sd_checkpoint=_optional_str(data.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(data.get("sd_checkpoint_name")),
    )


def load_embedding(path: Path) -> Embedding:
    path = Path(path)
    return embedding_from_data(read_embedding_file(path), path.stem, path.resolve())


def _embedding_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for file in sorted(files):
            path = Path(root) / file
            try:
                empty = path.stat().st_size == 0
            except OSError:  # a dangling link: nothing to load
                continue
            if path.suffix.lower() in EMBEDDING_SUFFIXES and not empty:
                found.append(path)
    return found


class EmbeddingMatch(NamedTuple):
    """An embedding found in a token list (the chunking code's `EmbeddingMatch` protocol)."""

    name: str
    n_tokens: int  # prompt tokens its name spans
    n_vectors: int  # positions its vectors fill


class SlotLike(Protocol):
    """Where one embedding's vectors go: the chunking code's `EmbeddingSlot`."""

    @property
    def name(self) -> str: ...

    @property
    def offset(self) -> int: ...  # index in the token row (BOS is 0) of the first vector


class ChunkLike(Protocol):
    """A 77-token chunk with its embedding slots: the chunking code's `Chunk`."""

    @property
    def embeddings(self) -> Sequence[SlotLike]: ...


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


def model_width(model: nn.Module) -> int:
    """The width an embedding must have for `model`: its text encoders' token-embedding widths, summed."""
    return sum(int(encoder.config.width) for encoder in model.text_encoders)  # type: ignore[attr-defined]


class ModelEmbeddings:
    """The embeddings usable with one model, with name lookup over that model's tokenizer."""

    def __init__(
        self,
        loaded: Mapping[str, Embedding],
        skipped: Mapping[str, Embedding],
        tokenizer: TokenizerLike,
        hasher: EmbeddingDatabase,
    ) -> None:
        self.loaded = MappingProxyType(dict(loaded))
        self.skipped = MappingProxyType(dict(skipped))
        self._hasher = hasher
        lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in self.loaded:
            ids = tuple(tokenizer.encode(name))
            if ids:
                lookup.setdefault(ids[0], []).append((ids, name))
        self._lookup = {first: sorted(entries, key=lambda e: -len(e[0])) for first, entries in lookup.items()}

    def find_at(self, tokens: Sequence[int], offset: int) -> EmbeddingMatch | None:
        """The embedding whose name's tokens start at `tokens[offset]` (longest name first), or None."""
        for ids, name in self._lookup.get(tokens[offset], ()):
            if tuple(tokens[offset : offset + len(ids)]) == ids:
                return EmbeddingMatch(name, len(ids), self.loaded[name].count)
        return None

    def vectors(self, name: str, width: int | None = None) -> torch.Tensor:
        """[n, D] vectors of a loaded embedding; `width` picks an SDXL file's clip_l (768) or clip_g (1280)."""
        embedding = self.loaded[name]
        if width is None:
            return next(iter(embedding.vectors.values()))
        return embedding.vectors_for(width)

    @torch.no_grad()
    def token_embeds(
        self, tokens: torch.Tensor, placements: Sequence[Sequence[SlotLike]], text_encoder: nn.Module
    ) -> torch.Tensor:
        """The token-embedding input [B, T, D] for `text_encoder` (pass it as `token_embeds=`) with each row's
        embedding vectors spliced in at their slots; vectors past the row's end are cut off."""
        table: nn.Embedding = text_encoder.embeddings.token_embedding  # type: ignore[assignment]
        embeds = table(tokens.to(table.weight.device, torch.long))
        width, length = embeds.shape[-1], embeds.shape[1]
        for row, slots in enumerate(placements):
            for slot in slots:
                vectors = self.vectors(slot.name, width).to(embeds.device, embeds.dtype)
                n = min(vectors.shape[0], length - slot.offset)
                if n > 0:
                    embeds[row, slot.offset : slot.offset + n] = vectors[:n]
        return embeds

    def embed_chunks(
        self, model: nn.Module, tokens: torch.Tensor, chunks: Sequence[ChunkLike]
    ) -> list[torch.Tensor | None] | None:
        """The conditioning code's `TokenEmbedder`: per text encoder of `model`, the token-embedding input of one
        chunk batch (`tokens` [B, 77], `chunks` their Chunk objects), or None when no chunk holds an embedding.
        Each encoder sees its own padding (OpenCLIP pads with 0 after the first EOS), as `encode_tokens` does."""
        placements = [chunk.embeddings for chunk in chunks]
        if not any(placements):
            return None
        eos = model.tokenizer.eos_id  # type: ignore[attr-defined]
        return [
            self.token_embeds(repad(tokens, eos, encoder.config.pad_token), placements, encoder)
            for encoder in model.text_encoders  # type: ignore[attr-defined]
        ]

    def hash(self, name: str) -> str:
        """The 12-hex short hash for `TI hashes`."""
        return self._hasher.hash(name)

    def listing(self) -> dict[str, dict[str, Any]]:
        return {
            "loaded": {name: e.listing() for name, e in self.loaded.items()},
            "skipped": {name: e.listing() for name, e in self.skipped.items()},
        }


class EmbeddingDatabase:
    """The embeddings under `dirs` (A1111: `embeddings/` or `--embeddings-dir`), loaded on first use and on
    `refresh()`. Files that fail to load are logged and listed in `errors`, as A1111 reports and goes on."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = [Path(d) for d in dirs]
        self._lock = threading.Lock()
        self._embeddings: Mapping[str, Embedding] | None = None
        self._errors: Mapping[str, str] = MappingProxyType({})
        self._hashes: dict[tuple[Path, float], str] = {}
        self._generation = 0  # bumped by each refresh; per-model views of an older one are rebuilt
        self._views: weakref.WeakKeyDictionary[nn.Module, tuple[int, ModelEmbeddings]] = weakref.WeakKeyDictionary()

    def refresh(self) -> None:
        """Reload every embedding file (A1111's `/refresh-embeddings`)."""
        found: dict[str, Embedding] = {}
        errors: dict[str, str] = {}
        for folder in self.dirs:
            if not folder.is_dir():
                continue
            for path in _embedding_files(folder):
                try:
                    embedding = load_embedding(path)
                except ModelLoadError as exc:
                    logger.warning("skipping embedding %s: %s", path, exc.message)
                    errors[str(path)] = exc.message
                    continue
                found[embedding.name] = embedding  # a later file with the same name wins, as in A1111
        ordered = {name: found[name] for name in sorted(found, key=str.lower)}
        with self._lock:
            self._embeddings = MappingProxyType(ordered)
            self._errors = MappingProxyType(errors)
            self._generation += 1

    def all(self) -> Mapping[str, Embedding]:
        with self._lock:
            current = self._embeddings
        if current is None:
            self.refresh()
            with self._lock:
                current = self._embeddings
        assert current is not None
        return current

    @property
    def errors(self) -> Mapping[str, str]:
        """Files the last refresh couldn't load (path → reason)."""
        self.all()
        with self._lock:
            return self._errors

    def split(self, width: int | None) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped) for a model of token-embedding `width`; None (no model) loads everything."""
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, Embedding] = {}
        for name, embedding in self.all().items():
            (loaded if width is None or embedding.shape == width else skipped)[name] = embedding
        return loaded, skipped

    def for_model(self, model: nn.Module) -> ModelEmbeddings:
        """The embeddings whose width fits `model` (an `SDModel`), looked up with its tokenizer; built once per
        model and refresh."""
        self.all()
        with self._lock:
            generation = self._generation
            cached = self._views.get(model)
        if cached is not None and cached[0] == generation:
            return cached[1]
        loaded, skipped = self.split(model_width(model))
        view = ModelEmbeddings(loaded, skipped, model.tokenizer, self)  # type: ignore[arg-type]
        with self._lock:
            self._views[model] = (generation, view)
        return view

    def listing(self, model: nn.Module | None = None) -> dict[str, dict[str, Any]]:
        """A1111's `/sdapi/v1/embeddings` body `{loaded: {name: item}, skipped: {name: item}}`."""
        loaded, skipped = self.split(model_width(model) if model is not None else None)
        return {
            "loaded": {name: e.listing() for name, e in loaded.items()},
            "skipped": {name: e.listing() for name, e in skipped.items()},
        }

    def hash(self, name: str) -> str:
        """The 12-hex short hash of an embedding's file (sha256 of the whole file), for `TI hashes`."""
        embedding = self.all()[name]
        key = (embedding.path, embedding.path.stat().st_mtime)
        with self._lock:
            hit = self._hashes.get(key)
        if hit is None:
            hit = sha256_file(embedding.path)
            with self._lock:
                self._hashes[key] = hit
        return hit[:SHORT_HASH_LENGTH]
