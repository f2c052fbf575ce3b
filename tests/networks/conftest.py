"""Fixtures for the networks tests: a tiny SD 1.x model loaded through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdserver.models.manager import load_checkpoint
from sdserver.models.sd_model import SDModel
from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs
from sdserver.models.tokenizer import CLIPTokenizer


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.load()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(random_sd1_state_dict(*tiny_sd1_configs(), seed=3), path)


@pytest.fixture(scope="session")
def model(tiny_path: Path, tokenizer: CLIPTokenizer) -> SDModel:
    return load_checkpoint(tiny_path, torch.float32, torch.device("cpu"), tokenizer)
