"""Shared fixtures: tiny random SD 1.x checkpoints in the original single-file layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdserver.models.synthetic import random_sd1_state_dict, tiny_sd1_configs
from sdserver.models.tokenizer import CLIPTokenizer


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.load()


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_sd1_state_dict(*tiny_sd1_configs(), seed=0)


@pytest.fixture()
def tiny_copy(tiny_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shallow copy tests may add keys to or drop keys from."""
    return dict(tiny_state)


@pytest.fixture()
def ckpt_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    return folder
