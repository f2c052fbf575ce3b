"""Fixtures shared across packages: a tiny SD 1.x checkpoint on disk and a recording JobControl."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from sdserver.engine.types import Interrupted, Skipped
from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny SD 1.x checkpoint in the original single-file layout, under models/Stable-diffusion."""
    root = tmp_path_factory.mktemp("data")
    path = root / "models" / "Stable-diffusion" / "tiny.safetensors"
    path.parent.mkdir(parents=True)
    unet, vae, text = tiny_sd1_configs()
    torch.manual_seed(0)
    save_checkpoint(random_sd1_state_dict(unet=unet, vae=vae, text=text, seed=0), path)
    return path


@dataclass
class RecordingControl:
    """A JobControl that records what the engine reports and can interrupt or skip at a given step."""

    interrupt_at: int | None = None  # 0-based step
    skip_at: tuple[int, int] | None = None  # (pass index, 0-based step)
    preview_every: int = 0
    passes: list[tuple[int, int, int]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    previews: list[Image.Image] = field(default_factory=list)

    def begin_pass(self, batch_index: int, batch_count: int, steps: int) -> None:
        self.passes.append((batch_index, batch_count, steps))

    def step(self, step: int, preview: Callable[[], Image.Image] | None) -> None:
        self.steps.append(step)
        if preview is not None:
            self.previews.append(preview())
        if self.interrupt_at is not None and step >= self.interrupt_at:
            raise Interrupted()
        if self.skip_at is not None and (len(self.passes) - 1, step) == self.skip_at:
            raise Skipped()

    def wants_preview(self, step: int) -> bool:
        return self.preview_every > 0 and (step + 1) % self.preview_every == 0


@pytest.fixture
def control() -> RecordingControl:
    return RecordingControl()
