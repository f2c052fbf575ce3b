import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from sdserver.errors import ModelLoadError
from sdserver.models.manager import ModelManager
from sdserver.models.synthetic import VAE_PREFIX, random_sd1_state_dict, save_checkpoint, tiny_sd1_configs
from sdserver.models.vae_files import find_vae_files, load_vae, resolve_vae, vae_beside


def _vae_tensors(seed: int) -> dict[str, torch.Tensor]:
    state = random_sd1_state_dict(*tiny_sd1_configs(), seed=seed)
    return {k[len(VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_finding_and_choosing(tmp_path: Path, ckpt_dir: Path) -> None:
    vae_dir = tmp_path / "models" / "VAE"
    a = _touch(vae_dir / "a.pt")
    b = _touch(vae_dir / "sub" / "b.safetensors")
    beside = _touch(ckpt_dir / "model.vae.safetensors")
    _touch(ckpt_dir / "model.safetensors")  # a checkpoint, not a VAE
    _touch(vae_dir / "readme.txt")
    files = find_vae_files([vae_dir], [ckpt_dir])
    assert files == [a.resolve(), b.resolve(), beside.resolve()]
    assert vae_beside(ckpt_dir / "model.safetensors") == beside
    assert resolve_vae("Automatic", files, ckpt_dir / "model.safetensors") == beside
    assert resolve_vae("Automatic", files, ckpt_dir / "other.safetensors") is None
    assert resolve_vae("None", files, ckpt_dir / "model.safetensors") is None
    assert resolve_vae("b.safetensors", files, None) == b.resolve()
    with pytest.raises(ModelLoadError, match="'c.pt' not found.*a.pt") as err:
        resolve_vae("c.pt", files, None)
    assert err.value.field == "sd_vae"


def test_load_vae_file_layouts(tmp_path: Path) -> None:
    like = tiny_sd1_configs()[1]
    tensors = _vae_tensors(seed=2)
    st = save_checkpoint({**tensors, "loss.logvar": torch.zeros(())}, tmp_path / "v.safetensors")
    torch.save({"state_dict": {VAE_PREFIX + k: v for k, v in tensors.items()}}, tmp_path / "v.pt")
    for path in (st, tmp_path / "v.pt"):
        vae = load_vae(path, like, torch.float32, "cpu")
        assert torch.equal(vae.decoder.conv_out.weight, tensors["decoder.conv_out.weight"])
        assert vae.config.scaling_factor == like.scaling_factor


def test_incompatible_vae_is_refused(tmp_path: Path) -> None:
    like = tiny_sd1_configs()[1]
    tensors = _vae_tensors(seed=2)
    del tensors["decoder.conv_in.bias"]
    with pytest.raises(ModelLoadError, match="decoder.conv_in.bias"):
        load_vae(save_checkpoint(tensors, tmp_path / "broken.safetensors"), like, torch.float32, "cpu")
    eight_channel_model = dataclasses.replace(like, embed_dim=8)
    with pytest.raises(ModelLoadError, match="latent channels"):
        load_vae(save_checkpoint(_vae_tensors(seed=2), tmp_path / "w.safetensors"), eight_channel_model,
                 torch.float32, "cpu")
    with pytest.raises(ModelLoadError, match="not a VAE"):
        load_vae(save_checkpoint({"x": torch.zeros(1)}, tmp_path / "x.safetensors"), like, torch.float32, "cpu")


def test_manager_switches_vae(tmp_path: Path, ckpt_dir: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tiny_state, ckpt_dir / "m.safetensors")
    save_checkpoint(tiny_state, ckpt_dir / "n.safetensors")
    vae_dir = tmp_path / "VAE"
    external = save_checkpoint(_vae_tensors(seed=9), vae_dir / "ft-mse.safetensors")
    beside = save_checkpoint(_vae_tensors(seed=10), ckpt_dir / "n.vae.safetensors")
    manager = ModelManager([ckpt_dir], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32,
                           vae_dirs=[vae_dir])
    model = manager.load("m")
    own = model.vae
    assert manager.current_vae is None

    info = manager.set_vae("ft-mse.safetensors")
    assert info is not None and manager.current_vae == info and model.vae is not own
    assert info.hash == hashlib.sha256(external.read_bytes()).hexdigest()[:10]
    assert torch.equal(model.vae.decoder.conv_out.weight, _vae_tensors(seed=9)["decoder.conv_out.weight"])

    with pytest.raises(ModelLoadError, match="nope"):
        manager.set_vae("nope")
    assert manager.vae_choice == "ft-mse.safetensors" and manager.current_vae == info

    assert manager.set_vae("None") is None and model.vae is own

    manager.set_vae("Automatic")
    assert manager.current_vae is None  # m has no VAE beside it
    manager.load("n")
    assert manager.current_vae is not None and manager.current_vae.filename == str(beside)
