"""The nn modules reproduce the original SD 1.5 key layout and parameter counts, and run at odd sizes."""

import torch

from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdserver.models.nn.unet import UNetModel
from sdserver.models.nn.vae import AutoencoderKL


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_sizes_and_keys_match_the_released_model() -> None:
    with torch.device("meta"):
        unet, vae, text = UNetModel(UNetConfig()), AutoencoderKL(VAEConfig()), CLIPTextModel(TextEncoderConfig())
    # Parameter counts of v1-5-pruned's UNet, VAE and CLIP ViT-L/14 text tower.
    assert _count(unet) == 859_520_964
    assert _count(vae) == 83_653_863
    assert _count(text) == 123_060_480
    keys = unet.state_dict()
    assert len(keys) == 686
    assert tuple(keys["output_blocks.5.2.conv.weight"].shape) == (1280, 1280, 3, 3)
    assert tuple(keys["input_blocks.1.1.proj_in.weight"].shape) == (320, 320, 1, 1)
    assert tuple(vae.state_dict()["decoder.up.3.upsample.conv.weight"].shape) == (512, 512, 3, 3)
    assert "encoder.layers.11.mlp.fc2.weight" in text.state_dict()


def test_unet_runs_on_latents_that_do_not_divide_evenly() -> None:
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), num_heads=2, context_dim=32)
    unet = UNetModel(cfg)
    out = unet(torch.randn(2, 4, 9, 7), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32))
    assert out.shape == (2, 4, 9, 7)
    assert torch.isfinite(out).all()


def test_sdxl_style_unet_needs_and_uses_vector_conditioning() -> None:
    torch.manual_seed(0)
    cfg = UNetConfig(
        model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
        num_head_channels=16, context_dim=48, use_linear_in_transformer=True, adm_in_channels=24,
    )
    unet = UNetModel(cfg)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([100.0]), torch.randn(1, 77, 48)
    a = unet(x, t, ctx, y=torch.zeros(1, 24))
    b = unet(x, t, ctx, y=torch.ones(1, 24))
    assert not torch.allclose(a, b)
    assert "label_emb.0.2.weight" in unet.state_dict()


def test_vae_downscales_by_eight_and_decodes_back_to_the_same_size() -> None:
    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1))
    z = vae.encode(torch.randn(1, 3, 64, 48))
    assert z.shape == (1, 4, 8, 6)
    assert vae.decode(z).shape == (1, 3, 64, 48)


def test_clip_skip_selects_earlier_layers_and_pooled_reads_the_eos_token() -> None:
    torch.manual_seed(0)
    text = CLIPTextModel(TextEncoderConfig(width=32, layers=3, heads=2, intermediate=64))
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 4])
    last, pooled = text(tokens, 1)
    penultimate, pooled2 = text(tokens, 2)
    assert not torch.allclose(last, penultimate)
    assert torch.allclose(pooled, pooled2)
    assert torch.allclose(pooled[0], last[0, 3])
    # Causal attention: a token's state does not depend on what follows it.
    changed = tokens.clone()
    changed[0, 2] = 2368
    assert torch.allclose(text(changed, 1)[0][0, :2], last[0, :2], atol=1e-6)
