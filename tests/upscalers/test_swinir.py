import pytest
import torch

from sdserver.errors import ModelLoadError
from sdserver.upscalers import architectures
from sdserver.upscalers.swinir import (
    SwinIR,
    SwinIRConfig,
    build_swinir,
    config_from_state_dict,
    pad_symmetric,
    shifted_window_mask,
)


def _config(upsampler: str, scale: int, window: int = 4, resi: str = "1conv") -> SwinIRConfig:
    return SwinIRConfig(
        in_channels=3,
        out_channels=3,
        embed_dim=12,
        depths=(2, 3),
        num_heads=(2, 3),
        window_size=window,
        mlp_hidden=24,
        qkv_bias=True,
        patch_norm=True,
        resi_connection=resi,
        upsampler=upsampler,
        scale=scale,
        num_feat=8 if upsampler in ("pixelshuffle", "nearest+conv") else 64,
        img_range=255.0 if window == 7 else 1.0,
    )


VARIANTS = {
    "classical_x2": _config("pixelshuffle", 2),
    "classical_x3": _config("pixelshuffle", 3),
    "classical_x4_3conv": _config("pixelshuffle", 4, resi="3conv"),
    "lightweight_x2": _config("pixelshuffledirect", 2),
    "realworld_x4": _config("nearest+conv", 4, resi="3conv"),
    "jpeg_x1": _config("", 1, window=7),
}


def _random_net(config: SwinIRConfig, seed: int = 0) -> SwinIR:
    net = SwinIR(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * 0.1)
    return net


def _as_file(net: SwinIR, train_size: int = 16) -> dict[str, torch.Tensor]:
    """The state dict as released files hold it: with the shifted blocks' attn_mask for the training size."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    ws = net.config.window_size
    for i, depth in enumerate(net.config.depths):
        for j in range(1, depth, 2):
            sd[f"layers.{i}.residual_group.blocks.{j}.attn_mask"] = torch.zeros(
                (train_size // ws) ** 2, ws * ws, ws * ws
            )
    return sd


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hyperparameters_are_inferred_and_output_reproduced(variant):
    config = VARIANTS[variant]
    net = _random_net(config)
    sd = _as_file(net)
    assert architectures.detect(frozenset(sd)) is architectures.Architecture.SWINIR
    assert config_from_state_dict(sd) == config
    rebuilt = build_swinir(sd)
    assert rebuilt.scale == config.scale
    for h, w in ((8, 12), (9, 13), (3, 5)):  # whole windows, ragged, and smaller than one window
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            out = rebuilt(x)
            assert out.shape == (1, 3, h * config.scale, w * config.scale)
            assert torch.equal(out, net(x))


def test_ragged_input_equals_running_on_the_mirrored_padding():
    net = _random_net(VARIANTS["classical_x2"])
    x = torch.rand(1, 3, 9, 6)
    padded = torch.cat([x, x.flip(2)], 2)[:, :, :12]  # SwinIR's test-script padding, done by hand
    padded = torch.cat([padded, padded.flip(3)], 3)[:, :, :, :8]
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(padded)[..., :18, :12])


def test_symmetric_padding_wider_than_the_image():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    out = pad_symmetric(x, 8)
    assert out.shape == (1, 1, 8, 8)
    assert out[0, 0, 0].tolist() == [0, 1, 2, 2, 1, 0, 0, 1]


def test_shift_mask_blocks_only_glued_regions():
    mask = shifted_window_mask(8, 8, (4, 4), (2, 2), torch.device("cpu"))
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window is contiguous in the shifted image
    assert (mask[3] != 0).any()  # the bottom-right one mixes four regions


def _reference_keys(
    embed: int, depths: list[int], window: int, mlp_hidden: int, upsampler: str, resi: str
) -> dict[str, tuple[int, ...] | None]:
    """Key names (and some shapes) of JingyunLiang/SwinIR's network_swinir.py, written from reading it.

    The `attn_mask` buffers of shifted blocks are left out: their size is the training patch size's.
    """
    keys: dict[str, tuple[int, ...] | None] = {"conv_first.weight": (embed, 3, 3, 3), "conv_first.bias": None}
    keys.update({"patch_embed.norm.weight": (embed,), "patch_embed.norm.bias": None})

    def conv_block(prefix: str) -> None:
        if resi == "1conv":
            keys.update({f"{prefix}.weight": (embed, embed, 3, 3), f"{prefix}.bias": None})
        else:
            keys.update({f"{prefix}.0.weight": (embed // 4, embed, 3, 3), f"{prefix}.2.weight": None})
            keys.update({f"{prefix}.4.weight": (embed, embed // 4, 3, 3)})
            keys.update({f"{prefix}.{i}.bias": None for i in (0, 2, 4)})

    for i, depth in enumerate(depths):
        for j in range(depth):
            b = f"layers.{i}.residual_group.blocks.{j}"
            keys[f"{b}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, 6 if embed == 180 else 8)
            keys[f"{b}.attn.relative_position_index"] = (window * window, window * window)
            keys[f"{b}.mlp.fc1.weight"] = (mlp_hidden, embed)
            for name in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                keys.setdefault(f"{b}.{name}.weight", None)
                keys[f"{b}.{name}.bias"] = None
        conv_block(f"layers.{i}.conv")
    keys.update({"norm.weight": None, "norm.bias": None})
    conv_block("conv_after_body")
    if upsampler == "pixelshuffle":
        keys.update({"conv_before_upsample.0.weight": (64, embed, 3, 3), "conv_before_upsample.0.bias": None})
        keys.update({"upsample.0.weight": (256, 64, 3, 3), "upsample.0.bias": None})
        keys.update({"conv_last.weight": (3, 64, 3, 3), "conv_last.bias": None})
    elif upsampler == "nearest+conv":
        keys.update({"conv_before_upsample.0.weight": (64, embed, 3, 3), "conv_before_upsample.0.bias": None})
        for name in ("conv_up1", "conv_up2", "conv_hr"):
            keys.update({f"{name}.weight": (64, 64, 3, 3), f"{name}.bias": None})
        keys.update({"conv_last.weight": (3, 64, 3, 3), "conv_last.bias": None})
    return keys


@pytest.mark.parametrize(
    "config,reference",
    [
        (  # 001_classicalSR_DF2K_s64w8_SwinIR-M_x2
            SwinIRConfig(3, 3, 180, (6,) * 6, (6,) * 6, 8, 360, True, True, "1conv", "pixelshuffle", 2, 64, 1.0),
            _reference_keys(180, [6] * 6, 8, 360, "pixelshuffle", "1conv"),
        ),
        (  # 003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN
            SwinIRConfig(3, 3, 240, (6,) * 9, (8,) * 9, 8, 480, True, True, "3conv", "nearest+conv", 4, 64, 1.0),
            _reference_keys(240, [6] * 9, 8, 480, "nearest+conv", "3conv"),
        ),
    ],
    ids=["classical_x2_M", "realworld_x4_L"],
)
def test_state_dict_keys_match_the_released_layout(config, reference):
    with torch.device("meta"):
        sd = SwinIR(config).state_dict()
    assert set(sd) == set(reference)
    for key, shape in reference.items():
        if shape is not None:
            assert tuple(sd[key].shape) == shape, key


# -- through the registry's file loading ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("variant", ["classical_x2", "realworld_x4", "lightweight_x2"])
def test_file_loads_and_upscales_like_the_original_network(file_round_trip, suffix, variant):
    net = _random_net(VARIANTS[variant], seed=3)
    reg, img = file_round_trip("SwinIR", net, _as_file(net), suffix)
    assert reg.upscale(img, 2.5, "tiny").size == (27, 17)


def test_corrupted_shape_is_a_load_error_naming_the_file(file_load_error):
    sd = _as_file(_random_net(VARIANTS["classical_x2"]))
    sd["layers.1.residual_group.blocks.2.mlp.fc2.weight"] = torch.zeros(12, 20)
    error = file_load_error("SwinIR", sd, "upscaler_1")
    assert error.field == "upscaler_1"
    assert "broken.safetensors" in error.message and "mlp.fc2" in error.message


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("layers.0.residual_group.blocks.0.attn.relative_position_bias_table", torch.zeros(10, 2), "(2·window−1)²"),
        ("upsample.0.weight", torch.zeros(20, 8, 3, 3), "upsample convs"),
        ("layers.1.residual_group.blocks.0.attn.relative_position_bias_table", torch.zeros(49, 5), "divisible"),
    ],
)
def test_uninterpretable_shapes_name_the_problem(key, value, words):
    sd = _as_file(_random_net(VARIANTS["classical_x2"]))
    sd[key] = value
    with pytest.raises(ModelLoadError) as err:
        build_swinir(sd)
    assert words in err.value.message


def test_a_grayscale_model_is_refused_at_load_naming_the_file():
    from dataclasses import replace

    gray = _random_net(replace(_config("", 1, window=7), in_channels=1, out_channels=1))
    with pytest.raises(ModelLoadError) as err:
        architectures.build(_as_file(gray), source="gray.pth", field="upscaler_1")
    assert "gray.pth" in err.value.message and "1-channel" in err.value.message
    assert err.value.field == "upscaler_1"
