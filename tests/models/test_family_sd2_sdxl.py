"""SD 2.x and SDXL: detection on full-size stripped layouts, tiny checkpoints through the real loader."""

import logging
from pathlib import Path

import pytest
import torch

from sdserver.models.families import detect
from sdserver.models.loader import load_checkpoint, validate_file
from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.config import TextEncoderConfig
from sdserver.models.openclip import hf_to_openclip, openclip_to_hf
from sdserver.models.sd_model import repad
from sdserver.models.synthetic import (
    family_shapes,
    random_state_dict,
    save_checkpoint,
    sd21_configs,
    sdxl_configs,
    tiny_sd2_configs,
    tiny_sdxl_configs,
)
from sdserver.models.tokenizer import CLIPTokenizer


def _tokens(tok: CLIPTokenizer, text: str) -> torch.Tensor:
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    return torch.tensor([ids + [tok.eos_id] * (77 - len(ids))])


def test_sd21_full_size_detection() -> None:
    shapes = family_shapes("sd2", sd21_configs())
    assert shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    match = detect(shapes)
    unet, vae, text = sd21_configs()
    assert match.family.name == "sd2"
    assert (match.spec.unet, match.spec.vae, match.spec.text_encoders) == (unet, vae, (text,))
    assert match.spec.fixed_text_layer == 2 and match.spec.prediction_source == "default"
    assert detect(family_shapes("sd2", sd21_configs(inpainting=True))).spec.is_inpainting


def test_sdxl_full_size_detection() -> None:
    shapes = family_shapes("sdxl", sdxl_configs())
    assert len(shapes) == 2514  # the released base file: 2515 with CLIP-L's position_ids buffer
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"] == (5120, 1280)
    match = detect(shapes)
    assert match.family.name == "sdxl"
    assert (match.spec.unet, match.spec.vae, *match.spec.text_encoders) == sdxl_configs()
    assert match.spec.vae.scaling_factor == 0.13025 and match.spec.default_size == (1024, 1024)
    assert match.spec.uses_pooled and not match.spec.final_layer_norm


def test_openclip_conversion_round_trips() -> None:
    cfg = tiny_sdxl_configs()[3]
    original = CLIPTextModel(cfg).state_dict()
    back = openclip_to_hf(hf_to_openclip(original), keep_projection=True)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


def _reference_text(
    state: dict[str, torch.Tensor], prefix: str, cfg: TextEncoderConfig, openclip: bool
) -> CLIPTextModel:
    entries = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if openclip:
        entries = openclip_to_hf(entries, keep_projection=cfg.projection_dim > 0)
    model = CLIPTextModel(cfg).eval()
    model.load_state_dict(entries)
    return model


def test_tiny_sd2_loads_and_uses_the_penultimate_openclip_layer(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    configs = tiny_sd2_configs()
    state = random_state_dict("sd2", configs, seed=4)
    path = save_checkpoint(state, tmp_path / "sd2.safetensors")
    model = load_checkpoint(path, torch.float32, "cpu", tokenizer, prediction_type="v")
    assert model.family == "sd2" and model.prediction_type == "v" and model.spec.prediction_source == "override"
    tokens = _tokens(tokenizer, "a green star")
    reference = _reference_text(state, "cond_stage_model.model.", configs[2], openclip=True)
    with torch.no_grad():
        expected = reference(repad(tokens, tokenizer.eos_id, 0), 2)[0]
    encoding = model.encode_tokens(tokens, clip_skip=1)  # SD 2.x ignores clip skip
    torch.testing.assert_close(encoding.context, expected)
    assert encoding.pooled is None
    out = model.apply_unet(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), encoding.context)
    assert out.shape == (1, 4, 8, 8)


def test_tiny_sdxl_loads_with_both_encoders(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    configs = tiny_sdxl_configs()
    state = random_state_dict("sdxl", configs, seed=5, dtype=torch.float16)
    model = load_checkpoint(save_checkpoint(state, tmp_path / "xl.safetensors"), torch.float32, "cpu", tokenizer)
    assert model.family == "sdxl" and model.scaling_factor == 0.13025 and model.default_size == (1024, 1024)
    tokens = _tokens(tokenizer, "a red circle")
    clip_l = _reference_text(state, "conditioner.embedders.0.transformer.text_model.", configs[2], openclip=False)
    big_g = _reference_text(state, "conditioner.embedders.1.model.", configs[3], openclip=True)
    with torch.no_grad():
        hidden_l, _ = clip_l.float()(tokens, 2, final_norm=False)
        hidden_g, pooled_g = big_g.float()(repad(tokens, tokenizer.eos_id, 0), 2, final_norm=False)
    encoding = model.encode_tokens(tokens)
    torch.testing.assert_close(encoding.context, torch.cat([hidden_l, hidden_g], dim=-1))
    torch.testing.assert_close(encoding.pooled, pooled_g)
    y = model.vector_conditioning(encoding.pooled, width=1024, height=768)
    assert y.shape == (1, configs[0].adm_in_channels)
    assert torch.equal(model.vector_conditioning(encoding.pooled[0], width=1024, height=768), y[0])
    out = model.apply_unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), encoding.context, y=y)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_repad_only_touches_positions_after_the_first_eos() -> None:
    tokens = torch.tensor([[49406, 5, 6, 49407, 49407, 49407], [49406, 7, 49407, 49407, 49407, 49407]])
    assert repad(tokens, 49407, 0).tolist() == [[49406, 5, 6, 49407, 0, 0], [49406, 7, 49407, 0, 0, 0]]
    assert repad(tokens, 49407, 49407) is tokens


def test_vector_conditioning_layout(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    from sdserver.models.nn.layers import timestep_embedding

    model = load_checkpoint(
        save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs()), tmp_path / "xl.safetensors"),
        torch.float32, "cpu", tokenizer,
    )
    pooled = torch.randn(2, 64)
    y = model.vector_conditioning(pooled, 832, 1216, crop_top=16, crop_left=8, target_width=1024, target_height=1024)
    assert torch.equal(y[:, :64], pooled)
    # Height before width, as SDXL's original_size_as_tuple.
    torch.testing.assert_close(y[0, 64:320], timestep_embedding(torch.tensor([1216]), 256)[0])
    torch.testing.assert_close(y[1, 320:576], timestep_embedding(torch.tensor([832]), 256)[0])
    torch.testing.assert_close(y[0, 576:832], timestep_embedding(torch.tensor([16]), 256)[0])
    torch.testing.assert_close(y[0, 832:1088], timestep_embedding(torch.tensor([8]), 256)[0])
    torch.testing.assert_close(y[1, 1088:1344], timestep_embedding(torch.tensor([1024]), 256)[0])


def test_prediction_type_sources(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    state = random_state_dict("sd2", tiny_sd2_configs(), seed=6)
    plain = save_checkpoint(state, tmp_path / "plain.safetensors")
    assert validate_file(plain).spec.prediction_source == "default"

    declared = save_checkpoint(state, tmp_path / "ms.safetensors", {"modelspec.prediction_type": "v"})
    assert load_checkpoint(declared, torch.float32, "cpu", tokenizer).spec.prediction_source == "metadata"
    assert validate_file(declared).spec.prediction_type == "v"

    marked = save_checkpoint({**state, "v_pred": torch.zeros(0)}, tmp_path / "marked.safetensors")
    assert validate_file(marked).spec.prediction_type == "v"

    yaml = tmp_path / "plain.yaml"
    yaml.write_text("model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    with_yaml = load_checkpoint(plain, torch.float32, "cpu", tokenizer, config=yaml)
    assert (with_yaml.prediction_type, with_yaml.spec.prediction_source) == ("v", "yaml")
    assert with_yaml.default_size == (768, 768)  # SD 2.x v-models are the 768 ones
    assert validate_file(plain).spec.default_size == (512, 512)
    overridden = load_checkpoint(plain, torch.float32, "cpu", tokenizer, config=yaml, prediction_type="eps")
    assert overridden.prediction_type == "eps"


@pytest.mark.parametrize(("std", "expected"), [(0.5, "v"), (0.01, "eps")])
def test_sd2_heuristic_is_logged(caplog: pytest.LogCaptureFixture, std: float, expected: str) -> None:
    from sdserver.models.families import detect as detect_family
    from sdserver.models.prediction import resolve_prediction

    state = random_state_dict("sd2", tiny_sd2_configs(), seed=7)
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    state[probe] = torch.randn(320) * std  # real SD 2.x UNets have this key; the tiny one doesn't
    match = detect_family({k: tuple(v.shape) for k, v in state.items()})
    with caplog.at_level(logging.WARNING):
        resolved = resolve_prediction(match, state)
    assert (resolved.spec.prediction_type, resolved.spec.prediction_source) == (expected, "heuristic")
    assert "guessed" in caplog.text


def test_sdxl_metadata_overrides_each_encoder() -> None:
    import dataclasses

    from sdserver.errors import ModelLoadError
    from sdserver.models.config_metadata import encode_config_metadata

    unet, vae, clip_l, big_g = sdxl_configs()
    shapes = family_shapes("sdxl", sdxl_configs())
    metadata = encode_config_metadata(
        text_encoders=(dataclasses.replace(clip_l, heads=6), dataclasses.replace(big_g, heads=10)),
        default_size=(896, 1152),
    )
    spec = detect(shapes, metadata).spec
    assert [t.heads for t in spec.text_encoders] == [6, 10] and spec.default_size == (896, 1152)
    with pytest.raises(ModelLoadError, match="two encoders"):
        detect(shapes, {"sdserver.config": '{"text_encoders": [{}]}'})
