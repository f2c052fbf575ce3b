"""The SDXL refiner layout: detection on full-size stripped shapes, a tiny checkpoint through the real loader,
and the refiner's vector conditioning."""

from pathlib import Path

import pytest
import torch

from sdserver.models.families import detect
from sdserver.models.family_sdxl import is_refiner, refiner_vector
from sdserver.models.loader import load_checkpoint
from sdserver.models.nn.layers import timestep_embedding
from sdserver.models.sd_model import repad
from sdserver.models.synthetic import (
    family_shapes,
    random_state_dict,
    save_checkpoint,
    sdxl_configs,
    sdxl_refiner_configs,
    tiny_sdxl_refiner_configs,
)
from sdserver.models.tokenizer import CLIPTokenizer

PREFIX = "conditioner.embedders.0.model."


def test_full_size_refiner_is_detected_with_its_own_architecture() -> None:
    shapes = family_shapes("sdxl_refiner", sdxl_refiner_configs())
    # Facts of sd_xl_refiner_1.0: 384 base channels, 2560-wide vector, bigG-only context, depth-4 attention.
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (384, 4, 3, 3)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1536, 2560)
    assert shapes["model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight"] == (768, 1280)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in shapes
    assert "model.diffusion_model.input_blocks.10.1.proj_in.weight" not in shapes
    assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight"] == (1536, 1536)
    assert shapes[PREFIX + "token_embedding.weight"] == (49408, 1280)
    assert not any(k.startswith("conditioner.embedders.1.") for k in shapes)
    match = detect(shapes)
    assert match.family.name == "sdxl_refiner" and is_refiner(match.spec)
    unet, vae, big_g = sdxl_refiner_configs()
    assert (match.spec.unet, match.spec.vae, match.spec.text_encoders) == (unet, vae, (big_g,))
    assert match.spec.unet.transformer_depth == (0, 4, 4, 0) and match.spec.unet.transformer_depth_middle == 4
    assert match.spec.uses_pooled and not match.spec.final_layer_norm and match.spec.fixed_text_layer == 2
    assert match.spec.default_size == (1024, 1024) and not match.spec.is_inpainting


def test_the_base_is_not_taken_for_a_refiner() -> None:
    spec = detect(family_shapes("sdxl", sdxl_configs())).spec
    assert spec.family == "sdxl" and not is_refiner(spec)


def test_tiny_refiner_loads_and_encodes_with_bigg(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.load()
    configs = tiny_sdxl_refiner_configs()
    state = random_state_dict("sdxl_refiner", configs, seed=3, dtype=torch.float16)
    model = load_checkpoint(save_checkpoint(state, tmp_path / "refiner.safetensors"), torch.float32, "cpu", tokenizer)
    assert model.family == "sdxl_refiner" and model.scaling_factor == 0.13025
    ids = [tokenizer.bos_id, *tokenizer.encode("a red circle"), tokenizer.eos_id]
    tokens = torch.tensor([ids + [tokenizer.eos_id] * (77 - len(ids))])
    encoding = model.encode_tokens(tokens, clip_skip=1)
    # Against bigG's own penultimate layer, read straight from the file's keys.
    from sdserver.models.nn.clip import CLIPTextModel
    from sdserver.models.openclip import openclip_to_hf

    entries = {k[len(PREFIX):]: v.float() for k, v in state.items() if k.startswith(PREFIX)}
    reference = CLIPTextModel(configs[2]).eval()
    reference.load_state_dict(openclip_to_hf(entries, keep_projection=True))
    with torch.no_grad():
        hidden, pooled = reference(repad(tokens, tokenizer.eos_id, 0), 2, final_norm=False)
    torch.testing.assert_close(encoding.context, hidden)
    torch.testing.assert_close(encoding.pooled, pooled)
    y = refiner_vector(encoding.pooled, 1024, 768, 6.0)
    out = model.apply_unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), encoding.context, y=y)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_refiner_vector_layout() -> None:
    pooled = torch.randn(2, 64)
    y = refiner_vector(pooled, width=832, height=1216, aesthetic_score=2.5, crop_top=16, crop_left=8)
    assert y.shape == (2, 64 + 5 * 256) and torch.equal(y[:, :64], pooled)

    def emb(value: float) -> torch.Tensor:
        return timestep_embedding(torch.tensor([value]), 256)[0]

    # sgm's embedder order: original size (height, width), crop (top, left), aesthetic score.
    for i, value in enumerate((1216, 832, 16, 8, 2.5)):
        torch.testing.assert_close(y[1, 64 + 256 * i : 64 + 256 * (i + 1)], emb(value))
    assert torch.equal(refiner_vector(pooled[0], 832, 1216, 2.5, crop_top=16, crop_left=8), y[0])
    assert not torch.equal(refiner_vector(pooled, 832, 1216, 6.0)[:, -256:], y[:, -256:])


def test_metadata_overrides_the_refiner_text_encoder() -> None:
    from sdserver.models.config_metadata import encode_config_metadata
    import dataclasses

    shapes = family_shapes("sdxl_refiner", sdxl_refiner_configs())
    big_g = sdxl_refiner_configs()[2]
    metadata = encode_config_metadata(text_encoder=dataclasses.replace(big_g, heads=10))
    assert detect(shapes, metadata).spec.text_encoders[0].heads == 10


@pytest.mark.parametrize("drop", ["model.diffusion_model.input_blocks.0.0.weight", PREFIX + "token_embedding.weight"])
def test_a_partial_refiner_is_not_detected(drop: str) -> None:
    from sdserver.errors import ModelLoadError

    shapes = family_shapes("sdxl_refiner", sdxl_refiner_configs())
    del shapes[drop]
    with pytest.raises(ModelLoadError):
        detect(shapes)
