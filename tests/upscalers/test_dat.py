import pytest
import torch

from sdserver.errors import ModelLoadError
from sdserver.upscalers import architectures
from sdserver.upscalers.dat import DAT, DATConfig, build_dat, config_from_state_dict, is_shifted
from sdserver.upscalers.swinir import shifted_window_mask


def _config(
    upsampler: str = "pixelshuffle",
    scale: int = 2,
    split: tuple[int, int] = (2, 4),
    ffn: int = 64,
    depths: tuple[int, ...] = (4, 3),
    heads: tuple[int, ...] = (4, 2),
    resi: str = "1conv",
) -> DATConfig:
    return DATConfig(
        in_channels=3,
        embed_dim=32,
        depths=depths,
        num_heads=heads,
        split_size=split,
        ffn_hidden=ffn,
        qkv_bias=True,
        resi_connection=resi,
        upsampler=upsampler,
        scale=scale,
        num_feat=8 if upsampler == "pixelshuffle" else 32,
    )


# The released variants at toy size: what distinguishes them is what the state dict shows.
VARIANTS = {
    "DAT_x2": _config(split=(2, 8), ffn=128),  # DAT: split 8×32, expansion 4
    "DAT_S_x3": _config(scale=3, split=(2, 4), ffn=64),  # DAT-S: split 8×16, expansion 2
    "DAT_2_x4": _config(scale=4, split=(2, 8), ffn=64),  # DAT-2: split 8×32, expansion 2
    "DAT_light_x2": _config("pixelshuffledirect", depths=(5,), heads=(4,), resi="3conv"),  # one group, direct
    "one_block_group": _config(depths=(4, 1), heads=(4, 2)),  # heads read from the spatial branch alone
}


def _random_net(config: DATConfig, seed: int = 0) -> DAT:
    net = DAT(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in net.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return net


def _as_file(net: DAT, train_size: int = 16) -> dict[str, torch.Tensor]:
    """The state dict as released files hold it: shifted blocks carry attn_mask_0/1 for the training size."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    s0, s1 = net.config.split_size
    for i, depth in enumerate(net.config.depths):
        for j in range(0, depth, 2):
            if is_shifted(i, j):
                cpu = torch.device("cpu")
                sd[f"layers.{i}.blocks.{j}.attn.attn_mask_0"] = shifted_window_mask(
                    train_size, train_size, (s0, s1), (s0 // 2, s1 // 2), cpu
                )
                sd[f"layers.{i}.blocks.{j}.attn.attn_mask_1"] = shifted_window_mask(
                    train_size, train_size, (s1, s0), (s1 // 2, s0 // 2), cpu
                )
    return sd


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hyperparameters_are_inferred_and_output_reproduced(variant):
    config = VARIANTS[variant]
    net = _random_net(config)
    sd = _as_file(net)
    assert architectures.detect(frozenset(sd)) is architectures.Architecture.DAT
    assert config_from_state_dict(sd) == config
    rebuilt = build_dat(sd)
    assert rebuilt.scale == config.scale
    for h, w in ((8, 16), (9, 13), (3, 5)):  # whole windows, ragged, smaller than one window
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            out = rebuilt(x)
            assert out.shape == (1, 3, h * config.scale, w * config.scale)
            assert torch.equal(out, net(x))


def test_shifted_blocks_follow_the_original_schedule():
    # Even groups shift blocks 2, 6, 10; odd groups 0, 4, 8 (spatial blocks only, i.e. even indices).
    assert [b for b in range(12) if is_shifted(0, b)] == [2, 6, 10]
    assert [b for b in range(12) if is_shifted(1, b)] == [0, 4, 8]
    sd = _as_file(_random_net(VARIANTS["DAT_x2"]))
    masks = sorted(k.rsplit(".attn.", 1)[0] for k in sd if k.endswith("attn_mask_0"))
    assert masks == ["layers.0.blocks.2", "layers.1.blocks.0"]


def _reference_keys(embed: int, depths: list[int], heads: int, split: tuple[int, int], ffn: int, light: bool):
    """Key names (and some shapes) of zhengchen1999/DAT's basicsr/archs/dat_arch.py, written from reading it.

    The shifted blocks' attn_mask_0/1 buffers are left out: their size is the training patch size's.
    """
    half = embed // 2
    pos_dim = half // 4 // 4
    keys: dict[str, tuple[int, ...] | None] = {"conv_first.weight": (embed, 3, 3, 3), "conv_first.bias": None}
    keys.update({"before_RG.1.weight": (embed,), "before_RG.1.bias": None, "norm.weight": None, "norm.bias": None})

    def add(prefix: str, shape: tuple[int, ...] | None = None, bias: bool = True) -> None:
        keys[f"{prefix}.weight"] = shape
        if bias:
            keys[f"{prefix}.bias"] = None

    def batchnorm(prefix: str) -> None:
        add(prefix)
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            keys[f"{prefix}.{stat}"] = None

    def resi(prefix: str) -> None:
        if light:
            add(f"{prefix}.0", (embed // 4, embed, 3, 3))
            add(f"{prefix}.2")
            add(f"{prefix}.4")
        else:
            add(prefix, (embed, embed, 3, 3))

    for i, depth in enumerate(depths):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            for name in ("norm1", "norm2", "attn.qkv", "attn.proj"):
                add(f"{b}.{name}")
            add(f"{b}.ffn.fc1", (ffn, embed))
            add(f"{b}.ffn.sg.norm", (ffn // 2,))
            add(f"{b}.ffn.sg.conv", (ffn // 2, 1, 3, 3))
            add(f"{b}.ffn.fc2", (embed, ffn // 2))
            add(f"{b}.attn.dwconv.0", (embed, 1, 3, 3))
            batchnorm(f"{b}.attn.dwconv.1")
            add(f"{b}.attn.channel_interaction.1", (embed // 8, embed, 1, 1))
            batchnorm(f"{b}.attn.channel_interaction.2")
            add(f"{b}.attn.channel_interaction.4")
            add(f"{b}.attn.spatial_interaction.0", (embed // 16, embed, 1, 1))
            batchnorm(f"{b}.attn.spatial_interaction.1")
            add(f"{b}.attn.spatial_interaction.3", (1, embed // 16, 1, 1))
            if j % 2:
                keys[f"{b}.attn.temperature"] = (heads, 1, 1)
                continue
            for k, (wh, ww) in enumerate((split, split[::-1])):
                a = f"{b}.attn.attns.{k}"
                keys[f"{a}.rpe_biases"] = ((2 * wh - 1) * (2 * ww - 1), 2)
                keys[f"{a}.relative_position_index"] = (wh * ww, wh * ww)
                add(f"{a}.pos.pos_proj", (pos_dim, 2))
                for n in (1, 2, 3):
                    add(f"{a}.pos.pos{n}.0", (pos_dim,))
                    add(f"{a}.pos.pos{n}.2", (heads // 2 if n == 3 else pos_dim, pos_dim))
        resi(f"layers.{i}.conv")
    resi("conv_after_body")
    if light:
        add("upsample.0", (3 * 2 * 2, embed, 3, 3))
    else:
        add("conv_before_upsample.0", (64, embed, 3, 3))
        add("upsample.0", (256, 64, 3, 3))
        add("conv_last", (3, 64, 3, 3))
    return keys


@pytest.mark.parametrize(
    "config,reference",
    [
        (  # DAT_x2: embed 180, 6×6 blocks, 6 heads, split 8×32, expansion 4
            DATConfig(3, 180, (6,) * 6, (6,) * 6, (8, 32), 720, True, "1conv", "pixelshuffle", 2, 64),
            _reference_keys(180, [6] * 6, 6, (8, 32), 720, light=False),
        ),
        (  # DAT_light_x2: embed 60, one group of 18, 6 heads, expansion 2, 3conv, direct upsampler
            DATConfig(3, 60, (18,), (6,), (8, 32), 120, True, "3conv", "pixelshuffledirect", 2, 60),
            _reference_keys(60, [18], 6, (8, 32), 120, light=True),
        ),
    ],
    ids=["DAT_x2", "DAT_light_x2"],
)
def test_state_dict_keys_match_the_released_layout(config, reference):
    with torch.device("meta"):
        sd = DAT(config).state_dict()
    assert set(sd) == set(reference)
    for key, shape in reference.items():
        if shape is not None:
            assert tuple(sd[key].shape) == shape, key


def test_split_size_is_read_from_the_stored_offsets():
    sd = _as_file(_random_net(_config(split=(4, 2))))
    assert config_from_state_dict(sd).split_size == (4, 2)
    offsets = sd["layers.0.blocks.0.attn.attns.0.rpe_biases"]
    assert offsets[-1].tolist() == [3.0, 1.0]  # the largest (dy, dx): window minus one


# -- through the registry's file loading ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("variant", ["DAT_x2", "DAT_light_x2"])
def test_file_loads_and_upscales_like_the_original_network(file_round_trip, suffix, variant):
    net = _random_net(VARIANTS[variant], seed=4)
    file_round_trip("DAT", net, _as_file(net), suffix)


def test_corrupted_shape_is_a_load_error_naming_the_file(file_load_error):
    sd = _as_file(_random_net(VARIANTS["DAT_x2"]))
    sd["layers.1.blocks.1.ffn.sg.conv.weight"] = torch.zeros(16, 1, 5, 5)
    error = file_load_error("DAT", sd, "hr_upscaler")
    assert error.field == "hr_upscaler"
    assert "broken.safetensors" in error.message and "sg.conv" in error.message


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("layers.0.blocks.0.attn.attns.0.rpe_biases", torch.zeros(7, 2), "does not describe a window"),
        ("layers.0.blocks.0.attn.attns.0.rpe_biases", None, "split"),
        ("upsample.0.weight", torch.zeros(20, 8, 3, 3), "upsample convs"),
        ("layers.1.blocks.1.attn.temperature", torch.ones(3, 1, 1), "head counts"),
    ],
)
def test_uninterpretable_shapes_name_the_problem(key, value, words):
    sd = _as_file(_random_net(VARIANTS["DAT_x2"]))
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    with pytest.raises(ModelLoadError) as err:
        build_dat(sd)
    assert words in err.value.message
