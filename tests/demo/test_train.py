"""The demo model's training pieces: initialisation, loss weights, and an export that loads like any checkpoint."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import load_file, save_file

from sdserver.demo.train import (
    TrainConfig, config_metadata, export_state_dict, min_snr_weights, scaled_linear_alphas_cumprod, tokenize,
    zero_init_outputs,
)
from sdserver.models.manager import load_checkpoint
from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdserver.models.nn.unet import UNetModel
from sdserver.models.nn.vae import AutoencoderKL
from sdserver.models.tokenizer import CLIPTokenizer

TINY = replace(
    TrainConfig(),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                    transformer_depth_middle=1, num_head_channels=16, context_dim=32),
    vae=VAEConfig(base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4),
    text=TextEncoderConfig(width=32, layers=1, heads=2, intermediate=64),
)


def test_a_zero_initialised_unet_predicts_zero_noise_but_still_has_gradients() -> None:
    unet = zero_init_outputs(UNetModel(TINY.unet))
    x = torch.randn(2, 4, 8, 8)
    out = unet(x, torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32))
    assert torch.equal(out, torch.zeros_like(out))
    (out - x).pow(2).mean().backward()  # the output conv still learns from the first loss
    assert unet.out[-1].weight.grad.abs().sum() > 0


def test_min_snr_weights_cap_the_easy_timesteps() -> None:
    alphas = scaled_linear_alphas_cumprod()
    w = min_snr_weights(alphas, 5.0)
    assert torch.all(w <= 1.0) and torch.all(w > 0)
    snr = alphas / (1 - alphas)
    assert torch.allclose(w[snr <= 5.0], torch.ones_like(w[snr <= 5.0]))
    assert w[0] < 0.01  # SNR ~ 1000 at t=0
    assert alphas[0] > alphas[-1] and abs(float(alphas[-1]) - 0.0047) < 0.0005  # SD 1.x's last alpha-bar


def test_the_export_loads_through_the_family_registry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = CLIPTokenizer.load()
    tokens = tokenize(tokenizer, ["a red circle", ""])
    assert tokens.shape == (2, 77) and tokens[0, 0] == tokenizer.bos_id
    torch.manual_seed(0)
    unet, vae, text = UNetModel(TINY.unet), AutoencoderKL(TINY.vae), CLIPTextModel(TINY.text)
    path = tmp_path / "demo.safetensors"
    save_file(export_state_dict(unet, vae, text, set(tokens.unique().tolist())), str(path),
              metadata=config_metadata(TINY, scale=0.5))
    model = load_checkpoint(path, torch.float32, "cpu")
    assert model.family == "sd1"
    assert model.default_size == (TINY.native_size, TINY.native_size)
    # Untrained token rows are zeroed; the caption's rows survive (fp16-rounded).
    weight = dict(text.named_parameters())["embeddings.token_embedding.weight"]
    saved = load_file(str(path))["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    used = tokens.unique()
    assert torch.allclose(saved[used].float(), weight[used].detach(), atol=1e-2)
    unused = torch.ones(saved.shape[0], dtype=torch.bool)
    unused[used] = False
    assert not saved[unused].any()
