from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdserver.errors import ModelLoadError
from sdserver.models.files import load_state_dict, read_metadata, read_shapes


@pytest.fixture()
def tensors() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.int64), "c": torch.zeros(2, 1, 1, 7)}


def test_safetensors_shapes_and_metadata(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    assert read_shapes(path) == {k: tuple(v.shape) for k, v in tensors.items()}
    assert read_metadata(path) == {"k": "v"}
    loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_safetensors_shapes_read_only_the_header(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    # Cut the tensor data off: shapes must still be readable, loading must fail with a typed error.
    path.write_bytes(path.read_bytes()[: 8 + header_len])
    assert read_shapes(path)["a.weight"] == (3, 4)
    with pytest.raises(ModelLoadError, match="m.safetensors"):
        load_state_dict(path)


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_state_dict_and_shapes(tmp_path: Path, tensors: dict[str, torch.Tensor], wrapped: bool) -> None:
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7} if wrapped else tensors, path)
    assert read_shapes(path) == {k: tuple(v.shape) for k, v in tensors.items()}
    assert read_metadata(path) == {}
    loaded = load_state_dict(path)
    assert set(loaded) == set(tensors) and torch.equal(loaded["a.weight"], tensors["a.weight"])


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}", b"\xff" * 16])
def test_garbage_safetensors_is_a_typed_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="junk.safetensors"):
        read_shapes(path)


def test_garbage_ckpt_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="junk.ckpt"):
        load_state_dict(path)


def test_ckpt_holding_a_non_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.ckpt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        ({"params_ema": {"w": torch.ones(1)}, "params": {"w": torch.zeros(1)}}, 1.0),  # BasicSR: EMA preferred
        ({"params": {"w": torch.zeros(1)}}, 0.0),
        ({"model": {"w": torch.full((1,), 2.0)}, "epoch": 3}, 2.0),
    ],
)
def test_training_containers_are_unwrapped(tmp_path: Path, container: dict, expected: float) -> None:
    path = tmp_path / "net.pth"
    torch.save(container, path)
    assert load_state_dict(path)["w"].item() == expected
