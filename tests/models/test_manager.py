import gc
import threading
import weakref
from pathlib import Path

import pytest
import torch

from sdserver.errors import ModelLoadError, ModelNotFound, NoModelAvailable
from sdserver.models import hashing
from sdserver.models.manager import ModelManager
from sdserver.models.synthetic import save_checkpoint


def _manager(folder: Path, tmp_path: Path, limit: int = 1, **kwargs: object) -> ModelManager:
    return ModelManager([folder], None, tmp_path / "data" / "cache.json", torch.device("cpu"), torch.float32,
                        limit, **kwargs)  # type: ignore[arg-type]


@pytest.fixture()
def three(ckpt_dir: Path, tiny_state: dict[str, torch.Tensor]) -> Path:
    for name in ("a", "b", "c"):
        # Different bytes per file, so hashes differ.
        state = dict(tiny_state)
        state["model.diffusion_model.out.2.bias"] = torch.full((4,), float(ord(name)))
        save_checkpoint(state, ckpt_dir / f"{name}.safetensors")
    return ckpt_dir


def test_no_checkpoint(ckpt_dir: Path, tmp_path: Path) -> None:
    manager = _manager(ckpt_dir, tmp_path)
    assert manager.checkpoints() == [] and manager.current is None and manager.current_info is None
    with pytest.raises(NoModelAvailable, match="Stable-diffusion"):
        manager.load("anything")
    with pytest.raises(NoModelAvailable):
        manager.ensure_loaded()


def test_listing_resolve_and_load(three: Path, tmp_path: Path) -> None:
    manager = _manager(three, tmp_path, hash_on_scan=True)
    infos = manager.checkpoints()
    assert [i.name for i in infos] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert all(i.hash and i.title == f"{i.name} [{i.hash}]" for i in infos)
    with pytest.raises(ModelNotFound, match="'zzz'"):
        manager.resolve("zzz")
    model = manager.load(infos[1].hash)  # type: ignore[arg-type]
    assert manager.current is model and manager.current_info == infos[1]
    assert model.unet.out[2].bias[0].item() == ord("b")
    assert manager.ensure_loaded() is model


def test_lru_keeps_limit_models(three: Path, tmp_path: Path) -> None:
    manager = _manager(three, tmp_path, limit=2)
    a = manager.load("a")
    b = manager.load("b")
    assert manager.load("a") is a  # cached: no reload
    manager.load("c")  # evicts b, the least recently used
    assert [i.name for i in manager.loaded()] == ["a.safetensors", "c.safetensors"]
    assert manager.current_info.name == "c.safetensors"  # type: ignore[union-attr]
    gone = weakref.ref(b)
    del b
    gc.collect()
    assert gone() is None


def test_failed_load_keeps_previous(three: Path, tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    del state["first_stage_model.encoder.conv_in.bias"]
    save_checkpoint(state, three / "broken.safetensors")
    (three / "junk.ckpt").write_bytes(b"garbage")
    manager = _manager(three, tmp_path)
    model = manager.load("a")
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors.*first_stage_model\.encoder\.conv_in\.bias"):
        manager.load("broken")
    with pytest.raises(ModelLoadError, match=r"junk\.ckpt"):
        manager.load("junk")
    assert manager.current is model and manager.current_info.name == "a.safetensors"  # type: ignore[union-attr]


def test_unload_frees_and_reload_restores(three: Path, tmp_path: Path) -> None:
    manager = _manager(three, tmp_path)
    gone = weakref.ref(manager.load("b"))
    manager.unload()
    assert manager.current is None and manager.loaded() == []
    assert gone() is None
    again = manager.reload()
    assert again is manager.current and manager.current_info.name == "b.safetensors"  # type: ignore[union-attr]
    assert manager.reload() is not again  # re-read from disk


def test_hashes_come_from_the_cache_after_restart(three: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _manager(three, tmp_path, hash_on_scan=True).checkpoints()
    monkeypatch.setattr(hashing, "sha256_file", lambda *a, **k: pytest.fail("rehashed a cached file"))
    assert _manager(three, tmp_path, hash_on_scan=True).checkpoints() == first
    assert all(i.hash for i in first)
    # Without hashing on scan, cached values still show in listings.
    assert _manager(three, tmp_path).checkpoints() == first


def test_hash_on_load_by_default(three: Path, tmp_path: Path) -> None:
    manager = _manager(three, tmp_path)
    assert manager.checkpoints()[0].hash is None
    manager.load("a.safetensors")
    info = manager.current_info
    assert info is not None and info.hash and info.title == f"a.safetensors [{info.hash}]"
    assert manager.checkpoints()[0] == info and manager.resolve(info.hash) == info


def test_refresh_sees_new_files(three: Path, tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    manager = _manager(three, tmp_path, hashing=False)
    assert len(manager.checkpoints()) == 3
    save_checkpoint(tiny_state, three / "new" / "d.ckpt")
    assert len(manager.checkpoints()) == 3
    manager.refresh()
    assert manager.resolve("new/d.ckpt").model_name == "new_d"
    manager.load("new/d.ckpt")
    assert manager.current_info is not None and manager.current_info.hash is None  # --no-hashing
    assert not (tmp_path / "data" / "cache.json").exists()


def test_listing_from_another_thread_while_loading(three: Path, tmp_path: Path) -> None:
    manager = _manager(three, tmp_path)
    manager.checkpoints()
    seen: list[int] = []
    reader = threading.Thread(target=lambda: [seen.append(len(manager.checkpoints())) for _ in range(50)])
    reader.start()
    manager.load("c")
    reader.join()
    assert seen and set(seen) == {3}
