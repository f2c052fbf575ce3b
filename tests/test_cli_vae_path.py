"""--vae-path (A1111: the VAE of every checkpoint, overriding sd_vae) and --no-half-vae, from the command line
to the loaded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdserver.cli import load_settings
from sdserver.engine.engine import create_engine
from sdserver.errors import ModelLoadError
from sdserver.models.manager import ModelManager
from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs

PREFIX = "first_stage_model."


@pytest.fixture()
def data_dir(tiny_state: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    root = tmp_path / "models" / "Stable-diffusion"
    save_checkpoint(tiny_state, root / "one.safetensors")
    save_checkpoint(tiny_state, root / "two.safetensors")
    return tmp_path


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A VAE file with other weights than the checkpoints' own."""
    state = random_sd1_state_dict(*tiny_sd1_configs(), seed=9)
    vae = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    path = tmp_path_factory.mktemp("vae") / "forced.vae.safetensors"
    save_file(vae, str(path))
    return path, vae


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_sd1_state_dict(*tiny_sd1_configs(), seed=0)


def uses(model, vae: dict[str, torch.Tensor]) -> bool:  # type: ignore[no-untyped-def]
    own = model.vae.state_dict()
    return all(torch.equal(own[k].reshape(v.shape), v) for k, v in vae.items())


def test_the_flag_reaches_settings_and_the_manager(data_dir: Path, other_vae) -> None:  # type: ignore[no-untyped-def]
    path, vae = other_vae
    settings = load_settings(
        ["--data-dir", str(data_dir), "--vae-path", str(path), "--skip-load-model-at-start", "--no-half-vae"], {}
    )
    assert settings.vae_path == path
    engine = create_engine(settings)
    assert engine.manager.vae_path == path
    assert engine.manager.vae_dtype == torch.float32
    assert path.resolve() in engine.vae_list()
    model = engine.manager.load("one")
    assert uses(model, vae)
    assert next(model.vae.parameters()).dtype == torch.float32
    current = engine.manager.current_vae
    assert current is not None and current.name == path.name


def test_the_forced_vae_wins_over_every_choice_and_every_checkpoint(  # type: ignore[no-untyped-def]
    data_dir: Path, other_vae, tiny_state
) -> None:
    path, vae = other_vae
    own = {k[len(PREFIX):]: v for k, v in tiny_state.items() if k.startswith(PREFIX)}
    root = data_dir / "models" / "Stable-diffusion"
    manager = ModelManager([root], None, data_dir / "cache.json", torch.device("cpu"), torch.float32, vae_path=path)
    for name in ("one", "two"):
        assert uses(manager.load(name), vae)
        for choice in ("None", "Automatic", "not-a-file.safetensors"):
            manager.set_vae(choice)
            assert uses(manager.current, vae), choice
    plain = ModelManager([root], None, data_dir / "cache2.json", torch.device("cpu"), torch.float32)
    assert uses(plain.load("one"), own) and not uses(plain.current, vae)


def test_a_missing_vae_path_fails_the_load_naming_the_flag(data_dir: Path) -> None:
    root = data_dir / "models" / "Stable-diffusion"
    missing = data_dir / "nope.safetensors"
    manager = ModelManager([root], None, data_dir / "cache.json", torch.device("cpu"), torch.float32,
                           vae_path=missing)
    with pytest.raises(ModelLoadError) as info:
        manager.load("one")
    assert info.value.field == "vae_path" and "nope.safetensors" in info.value.message
    assert manager.current is None
