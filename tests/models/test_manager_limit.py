"""`sd_checkpoints_limit`: the ModelManager's LRU capacity, set directly, through the options store and
through POST /sdapi/v1/options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from sdserver.api.a1111.options import Options, bind_engine
from sdserver.app import create_app
from sdserver.engine.engine import Libraries, LocalEngine
from sdserver.errors import InvalidRequest
from sdserver.models.manager import ModelManager
from sdserver.models.synthetic import save_checkpoint
from sdserver.networks import EmbeddingDatabase, NetworkLibrary
from sdserver.settings import Settings
from sdserver.upscalers.registry import UpscalerRegistry

NAMES = ("a", "b", "c")


@pytest.fixture()
def manager(tiny_state: dict[str, torch.Tensor], tmp_path: Path) -> ModelManager:
    root = tmp_path / "models" / "Stable-diffusion"
    for name in NAMES:
        save_checkpoint(tiny_state, root / f"{name}.safetensors")
    return ModelManager([root], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32, hashing=False)


def loaded(manager: ModelManager) -> list[str]:
    """Names of the cached models, least recently used first."""
    return [Path(info.filename).stem for info in manager.loaded()]


def engine_of(manager: ModelManager, tmp_path: Path) -> LocalEngine:
    libraries = Libraries(
        UpscalerRegistry({}), NetworkLibrary([tmp_path / "Lora"]), EmbeddingDatabase([tmp_path / "embeddings"])
    )
    return LocalEngine(manager, libraries)


def test_least_recently_used_models_are_evicted(manager: ModelManager) -> None:
    manager.set_limit(2)
    for name in ("a", "b", "c"):
        manager.load(name)
    assert loaded(manager) == ["b", "c"]
    manager.load("b")  # from the cache: becomes the most recent
    assert loaded(manager) == ["c", "b"]
    manager.load("a")
    assert loaded(manager) == ["b", "a"]
    manager.load("b")
    assert loaded(manager) == ["a", "b"]


def test_lowering_the_limit_evicts_at_once_and_keeps_the_current(manager: ModelManager) -> None:
    manager.set_limit(3)
    for name in ("c", "a", "b"):
        manager.load(name)
    assert loaded(manager) == ["c", "a", "b"]
    manager.set_limit(1)
    assert loaded(manager) == ["b"]
    assert manager.current_info is not None and manager.current_info.name == "b.safetensors"


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, None])
def test_a_limit_below_one_is_refused(manager: ModelManager, bad: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        manager.set_limit(bad)  # type: ignore[arg-type]
    assert info.value.field == "sd_checkpoints_limit"
    assert manager.limit == 1


def test_the_option_drives_the_limit(manager: ModelManager, tmp_path: Path) -> None:
    options = Options()
    engine = engine_of(manager, tmp_path)
    bind_engine(options, engine)
    assert manager.limit == 1  # A1111's default
    options.update({"sd_checkpoints_limit": 3})
    for name in ("b", "c", "a"):
        manager.load(name)
    assert loaded(manager) == ["b", "c", "a"]
    options.update({"sd_checkpoints_limit": "2"})  # form values arrive as strings
    assert loaded(manager) == ["c", "a"]
    with pytest.raises(InvalidRequest):
        options.update({"sd_checkpoints_limit": 0})
    assert options.get("sd_checkpoints_limit") == 2 and manager.limit == 2


def test_a_saved_limit_applies_at_start_and_a_broken_one_is_ignored(manager: ModelManager, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"sd_checkpoints_limit": 3}')
    bind_engine(Options(config), engine_of(manager, tmp_path))
    assert manager.limit == 3
    config.write_text('{"sd_checkpoints_limit": 0}')
    bind_engine(Options(config), engine_of(manager, tmp_path))
    assert manager.limit == 3


def test_post_options_changes_the_limit_and_eviction_follows(manager: ModelManager, tmp_path: Path) -> None:
    engine = engine_of(manager, tmp_path)
    app = create_app(Settings(data_dir=tmp_path / "data"), engine=engine)
    with TestClient(app) as client:
        # What app startup is to do once wired (see the report): the engine follows the options.
        bind_engine(app.state.options, app.state.engine)
        assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 2}).status_code == 200
        for name in ("a", "b", "c", "a"):
            response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"{name}.safetensors"})
            assert response.status_code == 200, response.text
        assert loaded(manager) == ["c", "a"]
        assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 0}).status_code >= 400
        assert client.get("/sdapi/v1/options").json()["sd_checkpoints_limit"] == 2
        assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 1}).status_code == 200
        assert loaded(manager) == ["a"]
