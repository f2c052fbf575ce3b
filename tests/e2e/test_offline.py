"""Loading a checkpoint and generating opens no network connection."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from sdserver.engine.engine import Libraries, LocalEngine
from sdserver.networks import EmbeddingDatabase, NetworkLibrary
from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
from sdserver.models.manager import ModelManager
from sdserver.upscalers.registry import UpscalerRegistry


def empty_libraries(tmp_path: Path) -> Libraries:
    return Libraries(UpscalerRegistry({}), NetworkLibrary([tmp_path / "Lora"]), EmbeddingDatabase([tmp_path / "embeddings"]))


def test_no_socket_is_opened_while_loading_and_generating(tiny_checkpoint: Path, tmp_path: Path, monkeypatch, control) -> None:  # type: ignore[no-untyped-def]
    opened: list[object] = []

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    manager = ModelManager([tiny_checkpoint.parent], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32)
    engine = LocalEngine(manager, empty_libraries(tmp_path))
    result = engine.generate(
        GenerationRequest(prompt="a cat", width=64, height=64, sampling=SamplingParams(sampler="dpmpp_2m", steps=3),
                          seeds=SeedParams(seed=1)),
        control,
    )
    assert len(result.images) == 1
    assert result.model_hash is not None and len(result.model_hash) == 10
    assert opened == []
