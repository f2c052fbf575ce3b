"""SDXL inpainting (9-channel SDXL UNet): detection on the full-size stripped layout and a tiny checkpoint
through the real loader."""

from pathlib import Path

import torch

from sdserver.models.families import detect
from sdserver.models.loader import load_checkpoint
from sdserver.models.synthetic import family_shapes, random_state_dict, save_checkpoint, sdxl_configs, tiny_sdxl_configs
from sdserver.models.tokenizer import CLIPTokenizer


def test_full_size_sdxl_inpainting_is_detected() -> None:
    shapes = family_shapes("sdxl", sdxl_configs(inpainting=True))
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)
    match = detect(shapes)
    assert match.family.name == "sdxl" and match.spec.is_inpainting
    assert match.spec.unet == sdxl_configs(inpainting=True)[0]
    assert not detect(family_shapes("sdxl", sdxl_configs())).spec.is_inpainting


def test_tiny_sdxl_inpainting_loads_and_takes_nine_channels(tmp_path: Path) -> None:
    state = random_state_dict("sdxl", tiny_sdxl_configs(inpainting=True), seed=2)
    model = load_checkpoint(save_checkpoint(state, tmp_path / "xl-inpaint.safetensors"), torch.float32, "cpu",
                            CLIPTokenizer.load())
    assert model.family == "sdxl" and model.is_inpainting
    context = torch.randn(1, 77, model.spec.unet.context_dim)
    y = model.vector_conditioning(torch.randn(64), 64, 64)[None]
    concat = torch.randn(1, 5, 8, 8)
    out = model.apply_unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), context, y=y, concat=concat)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
