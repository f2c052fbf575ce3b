"""Tiny random SD 1.x checkpoints through the real loader: file → detect → build → forward."""

import dataclasses
from pathlib import Path

import pytest
import torch

from sdserver.errors import ModelLoadError
from sdserver.models.build import build_model
from sdserver.models.config_metadata import encode_config_metadata
from sdserver.models.families import detect
from sdserver.models.files import load_state_dict, read_metadata, read_shapes
from sdserver.models.loader import load_checkpoint, validate_file
from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.unet import UNetModel
from sdserver.models.synthetic import (
    TEXT_PREFIX,
    UNET_PREFIX,
    random_sd1_state_dict,
    save_checkpoint,
    tiny_sd1_configs,
)
from sdserver.models.tokenizer import CLIPTokenizer


def _tokens(tok: CLIPTokenizer, text: str) -> torch.Tensor:
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    return torch.tensor([ids + [tok.eos_id] * (77 - len(ids))])


def _reference_unet(state: dict[str, torch.Tensor]) -> UNetModel:
    unet = UNetModel(tiny_sd1_configs()[0])
    unet.load_state_dict({k[len(UNET_PREFIX) :]: v.float() for k, v in state.items() if k.startswith(UNET_PREFIX)})
    return unet.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_through_files(tmp_path: Path, tokenizer: CLIPTokenizer, suffix: str, stored: torch.dtype) -> None:
    state = random_sd1_state_dict(*tiny_sd1_configs(), seed=1, dtype=stored)
    path = save_checkpoint(state, tmp_path / f"tiny{suffix}")
    assert load_state_dict(path)[UNET_PREFIX + "out.2.weight"].dtype == stored
    model = load_checkpoint(path, torch.float32, torch.device("cpu"), tokenizer)
    assert model.family == "sd1" and model.dtype == torch.float32 and not model.is_inpainting
    # The loaded weights are the stored ones, cast.
    loaded = model.unet.state_dict()
    for key in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "out.2.weight"):
        assert torch.equal(loaded[key], state[UNET_PREFIX + key].float())

    context = model.encode_tokens(_tokens(tokenizer, "a photo of a cat")).context
    assert context.shape == (1, 77, 32) and context.dtype == torch.float32
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 10.0])
    out = model.apply_unet(x, t, context.expand(2, -1, -1))
    with torch.no_grad():
        expected = _reference_unet(state)(x, t, context.expand(2, -1, -1))
    torch.testing.assert_close(out, expected)
    image = model.decode_latent(x)
    assert image.shape == (2, 3, 64, 64) and torch.isfinite(image).all()
    assert model.encode_image(image).shape == (2, 4, 8, 8)


def test_compute_dtype_keeps_stored_weights(tiny_state: dict[str, torch.Tensor], tokenizer: CLIPTokenizer) -> None:
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny_state.items()}
    match = detect({k: tuple(v.shape) for k, v in state.items()})
    model = build_model(state, match, torch.bfloat16, "cpu", tokenizer)
    key = "input_blocks.0.0.weight"
    # Same dtype and device: the checkpoint's tensor itself is used, no copy.
    assert model.unet.state_dict()[key].data_ptr() == state[UNET_PREFIX + key].data_ptr()
    out = model.apply_unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_no_text_model_level_and_position_ids(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    state = random_sd1_state_dict(*tiny_sd1_configs(), text_model_prefix=False, position_ids=True)
    assert "cond_stage_model.transformer.embeddings.position_ids" in state
    model = load_checkpoint(save_checkpoint(state, tmp_path / "short.safetensors"), torch.float32, "cpu", tokenizer)
    weight = model.text_encoders[0].state_dict()["encoder.layers.1.mlp.fc2.weight"]
    assert torch.equal(weight, state["cond_stage_model.transformer.encoder.layers.1.mlp.fc2.weight"])


def test_metadata_heads_are_honoured(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    unet, vae, text = tiny_sd1_configs()
    text = dataclasses.replace(text, heads=4)
    unet = dataclasses.replace(unet, num_heads=2)
    state = random_sd1_state_dict(unet, vae, text, seed=3)
    path = save_checkpoint(state, tmp_path / "m.safetensors", encode_config_metadata(unet, vae, text))
    model = load_checkpoint(path, torch.float32, "cpu", tokenizer)
    assert model.spec.text_encoders[0].heads == 4 and model.spec.unet.num_heads == 2
    reference = CLIPTextModel(text).eval()
    reference.load_state_dict({k[len(TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)
                               and not k.endswith("position_ids")})
    tokens = _tokens(tokenizer, "a red circle")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_tokens(tokens).context, reference(tokens)[0])


def test_vae_linear_attention_weights_load(tiny_copy: dict[str, torch.Tensor], tokenizer: CLIPTokenizer) -> None:
    key = "first_stage_model.decoder.mid.attn_1.v.weight"
    original = tiny_copy[key]
    tiny_copy[key] = original[:, :, 0, 0]  # diffusers-converted files store these as Linear [C, C]
    match = detect({k: tuple(v.shape) for k, v in tiny_copy.items()})
    model = build_model(tiny_copy, match, torch.float32, "cpu", tokenizer)
    assert torch.equal(model.vae.decoder.mid.attn_1.v.weight, original)


def _write(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    return save_checkpoint(state, tmp_path / "broken.safetensors")


def test_missing_tensor_is_named(tmp_path: Path, tiny_copy: dict[str, torch.Tensor], tokenizer: CLIPTokenizer) -> None:
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"
    del tiny_copy[key]
    path = _write(tmp_path, tiny_copy)
    for attempt in (lambda: validate_file(path), lambda: load_checkpoint(path, torch.float32, "cpu", tokenizer)):
        with pytest.raises(ModelLoadError, match=r"missing tensors .*" + key.replace(".", r"\.")):
            attempt()
    match = detect(read_shapes(path), read_metadata(path))
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        build_model(load_state_dict(path), match, torch.float32, "cpu", tokenizer)


def test_mismatched_shape_is_named(tmp_path: Path, tiny_copy: dict[str, torch.Tensor]) -> None:
    key = "first_stage_model.decoder.up.1.block.0.conv2.weight"
    tiny_copy[key] = torch.zeros(5, 5, 3, 3)
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.") + r" has shape \[5, 5, 3, 3\]"):
        validate_file(_write(tmp_path, tiny_copy))


def test_unexpected_tensor_is_named(tmp_path: Path, tiny_copy: dict[str, torch.Tensor]) -> None:
    tiny_copy["cond_stage_model.transformer.text_model.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(2, 2)
    tiny_copy["model_ema.decay"] = torch.tensor(0.999)  # outside every component: ignored
    tiny_copy["first_stage_model.loss.logvar"] = torch.zeros(())  # VAE training state: ignored
    with pytest.raises(ModelLoadError, match=r"unexpected tensors .*layers\.7\.mlp\.fc1\.weight") as err:
        validate_file(_write(tmp_path, tiny_copy))
    assert "model_ema" not in err.value.message and "loss" not in err.value.message


def test_inpainting_checkpoint_takes_concat(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    state = random_sd1_state_dict(*tiny_sd1_configs(inpainting=True))
    model = load_checkpoint(save_checkpoint(state, tmp_path / "inpaint.safetensors"), torch.float32, "cpu", tokenizer)
    assert model.is_inpainting and model.latent_channels == 4
    x = torch.randn(1, 4, 8, 8)
    out = model.apply_unet(x, torch.tensor([10.0]), torch.randn(1, 77, 32), concat=torch.randn(1, 5, 8, 8))
    assert out.shape == (1, 4, 8, 8)
