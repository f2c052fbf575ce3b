"""Weights stay in their stored dtype where the compute dtype allows: a half-precision file loaded for
half-precision compute is used in place (its tensors are the file's memory map, not copies); only a different
compute dtype makes converted copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdserver.models.manager import load_checkpoint
from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the memory map from /proc")


def mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `file`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() == str(file.resolve()):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def in_file(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


@pytest.fixture(scope="module")
def half_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = random_sd1_state_dict(*tiny_sd1_configs(), seed=2, dtype=torch.float16)
    return save_checkpoint(state, tmp_path_factory.mktemp("fp16") / "half.safetensors")


def test_fp16_file_for_fp16_compute_is_used_in_place(half_file: Path) -> None:
    model = load_checkpoint(half_file, torch.float16, "cpu")
    weights = model.state_dict()
    assert {t.dtype for t in weights.values()} == {torch.float16}
    ranges = mapped_ranges(half_file)
    assert ranges, "the weights should be mapped from the file"
    assert all(in_file(t, ranges) for t in weights.values())


def test_fp32_compute_converts_and_a_separate_vae_dtype_converts_only_the_vae(half_file: Path) -> None:
    full = load_checkpoint(half_file, torch.float32, "cpu")
    assert {t.dtype for t in full.state_dict().values()} == {torch.float32}

    mixed = load_checkpoint(half_file, torch.float16, "cpu", vae_dtype=torch.float32)
    ranges = mapped_ranges(half_file)
    assert all(in_file(t, ranges) and t.dtype == torch.float16 for t in mixed.unet.state_dict().values())
    assert all(in_file(t, ranges) for t in mixed.text_encoders.state_dict().values())
    assert all(t.dtype == torch.float32 and not in_file(t, ranges) for t in mixed.vae.state_dict().values())
