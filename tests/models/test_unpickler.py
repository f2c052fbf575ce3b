import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sdserver.errors import UnsafeCheckpoint
from sdserver.models import unpickler
from sdserver.models.files import load_state_dict, read_shapes


class _Evil:
    """Pickles as a call to os.system that would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_plain_pickle_is_really_dangerous(tmp_path: Path) -> None:
    """Control: the crafted pickle does create the file under plain pickle, so the tests below mean something."""
    marker = tmp_path / "pwned-control"
    pickle.loads(pickle.dumps(_EvilOpen(marker)))
    assert marker.exists()


@pytest.mark.parametrize("payload", [_Evil, _EvilOpen])
def test_zip_ckpt_with_malicious_global_is_refused(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": payload(marker)}, path)
    for reader in (load_state_dict, read_shapes):
        with pytest.raises(UnsafeCheckpoint) as err:
            reader(path)
        assert "system" in err.value.message or "open" in err.value.message
        assert str(path) in err.value.message
    assert not marker.exists()


def test_legacy_format_is_restricted_too(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(pickle.dumps(_Evil(marker)))  # not a zip: torch takes its legacy path
    with pytest.raises(UnsafeCheckpoint, match="system"):
        load_state_dict(path)
    assert not marker.exists()


def test_legacy_torch_save_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    state = {"state_dict": {"a.weight": torch.arange(6.0).reshape(2, 3)}}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_state_dict(path)
    assert torch.equal(loaded["a.weight"], torch.arange(6.0).reshape(2, 3))
    assert read_shapes(path) == {"a.weight": (2, 3)}


def test_direct_refusal_names_the_global() -> None:
    data = pickle.dumps(_EvilOpen(Path("/nonexistent/x")))
    with pytest.raises(UnsafeCheckpoint, match=r"builtins\.open|io\.open"):
        unpickler.loads(data)


def test_training_checkpoint_contents_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numpy scalars, OrderedDicts and Lightning's ModelCheckpoint callback, as 2022-era .ckpt files hold."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_score = torch.tensor(0.5)
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    path = tmp_path / "trained.ckpt"
    torch.save(
        {
            "epoch": np.int64(3),
            "global_step": np.float64(1234.0),
            "callbacks": {ModelCheckpoint: ModelCheckpoint()},
            "state_dict": {"model.w": torch.ones(3, dtype=torch.float16)},
        },
        path,
    )
    monkeypatch.undo()  # Lightning is "not installed" while loading: it must not be imported
    assert "pytorch_lightning" not in sys.modules
    loaded = load_state_dict(path)
    assert list(loaded) == ["model.w"] and loaded["model.w"].dtype == torch.float16
    raw = torch.load(path, pickle_module=unpickler, weights_only=False)
    assert raw["epoch"] == 3 and raw["global_step"] == 1234.0
    [(key, callback)] = raw["callbacks"].items()
    assert key is unpickler.Placeholder and isinstance(callback, unpickler.Placeholder)
    assert callback.state["monitor"] == "val/loss"
    assert "pytorch_lightning" not in sys.modules
