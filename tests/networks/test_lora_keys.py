"""Key mapping: every kohya module name of the real SD 1.5 layout lands on an existing parameter, at the block
A1111's own formulas give; other spellings (LDM-native, PEFT, old diffusers processors) resolve the same."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from sdserver.errors import UnsupportedFeature
from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig
from sdserver.models.nn.unet import UNetModel
from sdserver.models.synthetic import sd15_configs
from sdserver.networks.lora_keys import Target, build_target_table, split_key

_ATTENTION_LAYERS = [
    "proj_in", "proj_out", "norm",
    *(f"transformer_blocks.0.{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.norm1", "transformer_blocks.0.norm2", "transformer_blocks.0.norm3",
]
_RESNET_LAYERS = ["conv1", "conv2", "time_emb_proj", "norm1", "norm2"]


def sd15_diffusers_modules() -> list[str]:
    """diffusers' UNet2DConditionModel module paths for SD 1.5, written from its block structure."""
    names = ["conv_in", "conv_out", "conv_norm_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    for block in range(4):
        for res in range(2):
            names += [f"down_blocks.{block}.resnets.{res}.{n}" for n in _RESNET_LAYERS]
            if block < 3:
                names += [f"down_blocks.{block}.attentions.{res}.{n}" for n in _ATTENTION_LAYERS]
        if block in (1, 2):  # channel count changes: 320→640, 640→1280
            names.append(f"down_blocks.{block}.resnets.0.conv_shortcut")
        if block < 3:
            names.append(f"down_blocks.{block}.downsamplers.0.conv")
    for res in range(2):
        names += [f"mid_block.resnets.{res}.{n}" for n in _RESNET_LAYERS]
    names += [f"mid_block.attentions.0.{n}" for n in _ATTENTION_LAYERS]
    for block in range(4):
        for res in range(3):
            names += [f"up_blocks.{block}.resnets.{res}.{n}" for n in [*_RESNET_LAYERS, "conv_shortcut"]]
            if block > 0:
                names += [f"up_blocks.{block}.attentions.{res}.{n}" for n in _ATTENTION_LAYERS]
        if block < 3:
            names.append(f"up_blocks.{block}.upsamplers.0.conv")
    return names


_RESNET_SUFFIX = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "norm1": "in_layers.0", "norm2": "out_layers.0", "conv_shortcut": "skip_connection"}


def a1111_ldm_name(diffusers: str) -> str:
    """The LDM module path by A1111's hard-coded SD 1.x formulas (`convert_diffusers_name_to_compvis`)."""
    simple = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    if diffusers in simple:
        return simple[diffusers]
    if m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv", diffusers):
        return f"input_blocks.{3 + 3 * int(m[1])}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv", diffusers):
        return f"output_blocks.{2 + 3 * int(m[1])}.{2 if int(m[1]) > 0 else 1}.conv"
    m = re.fullmatch(r"(down_blocks|mid_block|up_blocks)\.?(\d)?\.?(attentions|resnets)\.(\d)\.(.+)", diffusers)
    assert m, diffusers
    where, block, kind, index, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    rest = _RESNET_SUFFIX[rest] if kind == "resnets" else rest
    slot = 1 if kind == "attentions" else 0
    if where == "down_blocks":
        return f"input_blocks.{1 + 3 * block + index}.{slot}.{rest}"
    if where == "up_blocks":
        return f"output_blocks.{3 * block + index}.{slot}.{rest}"
    return f"middle_block.{1 if kind == 'attentions' else 2 * index}.{rest}"


@pytest.fixture(scope="module")
def sd15() -> SimpleNamespace:
    unet_cfg, _, text_cfg = sd15_configs()
    with torch.device("meta"):
        model = SimpleNamespace(family="sd1", unet=UNetModel(unet_cfg), text_encoders=[CLIPTextModel(text_cfg)])
    model.table = build_target_table(model)  # type: ignore[arg-type]
    return model


def test_every_kohya_unet_name_of_sd15_maps_to_a1111s_block(sd15: SimpleNamespace) -> None:
    params = dict(sd15.unet.named_parameters())
    names = sd15_diffusers_modules()
    # 16 attention blocks x 16 layers, 22 resnets x 5 + 14 shortcuts, 3 samplers each way, 5 stem/head layers.
    assert len(names) == len(set(names)) == 16 * 16 + 22 * 5 + 14 + 3 + 3 + 5
    for diffusers in names:
        target = sd15.table.resolve("lora_unet_" + diffusers.replace(".", "_"))
        assert target == Target("unet", a1111_ldm_name(diffusers)), diffusers
        assert target.param in params, diffusers


def test_every_weighted_unet_module_has_a_diffusers_name(sd15: SimpleNamespace) -> None:
    expected = {a1111_ldm_name(n) for n in sd15_diffusers_modules()}
    ours = {name for name, m in sd15.unet.named_modules() if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    assert ours == expected


def test_every_kohya_text_encoder_name_maps(sd15: SimpleNamespace) -> None:
    params = dict(sd15.text_encoders[0].named_parameters())
    layers = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
              "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
              "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2", "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2"}
    for layer in range(12):
        for kohya, ours in layers.items():
            target = sd15.table.resolve(f"lora_te_text_model_encoder_layers_{layer}_{kohya}")
            assert target == Target("text_encoder", f"encoder.layers.{layer}.{ours}")
            assert target.param in params


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_unet_input_blocks_1_1_proj_in", Target("unet", "input_blocks.1.1.proj_in")),
        ("diffusion_model_output_blocks_5_2_conv", Target("unet", "output_blocks.5.2.conv")),
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", Target("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_k")),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora", Target("unet", "middle_block.1.transformer_blocks.0.attn1.to_out.0")),
        ("text_encoder.text_model.encoder.layers.3.mlp.fc2", Target("text_encoder", "encoder.layers.3.mlp.fc2")),
        ("text_encoder.text_model.encoder.layers.3.self_attn.k_proj.lora_linear_layer", Target("text_encoder", "encoder.layers.3.self_attn.k_proj")),
        ("unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2.lora", Target("unet", "output_blocks.5.1.transformer_blocks.0.ff.net.2")),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", Target("text_encoder", "encoder.layers.0.self_attn.q_proj")),
        ("transformer_text_model_encoder_layers_0_self_attn_q_proj", Target("text_encoder", "encoder.layers.0.self_attn.q_proj")),
        ("lora_unet_up_blocks_3_attentions_2_proj_out", Target("unet", "output_blocks.11.1.proj_out")),
    ],
)
def test_other_spellings_resolve(sd15: SimpleNamespace, key: str, expected: Target) -> None:
    assert sd15.table.resolve(key) == expected


def test_unknown_module_names_dont_resolve(sd15: SimpleNamespace) -> None:
    assert sd15.table.resolve("lora_unet_down_blocks_3_attentions_0_proj_in") is None  # SD 1.5 has none there
    assert sd15.table.resolve("lora_te2_text_model_encoder_layers_0_mlp_fc1") is None  # an SDXL-only encoder


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_unet_a_b.lora_down.weight", ("lora_unet_a_b", "lora_down.weight")),
        ("lora_unet_a_b.alpha", ("lora_unet_a_b", "alpha")),
        ("lora_unet_a_b.hada_w1_a", ("lora_unet_a_b", "hada_w1_a")),
        ("lora_te_x.diff_b", ("lora_te_x", "diff_b")),
        ("unet.a.b.lora_A.weight", ("unet.a.b", "lora_down.weight")),
        ("unet.a.b.lora_B.weight", ("unet.a.b", "lora_up.weight")),
        ("text_encoder.a.b.alpha", ("text_encoder.a.b", "alpha")),
        ("unet.a.processor.to_q_lora.up.weight", ("unet.a.processor.to_q_lora", "lora_up.weight")),
    ],
)
def test_split_key(key: str, expected: tuple[str, str]) -> None:
    assert split_key(key) == expected


def test_unsupported_family_is_refused() -> None:
    with pytest.raises(UnsupportedFeature, match="flux"):
        build_target_table(SimpleNamespace(family="flux", unet=None, text_encoders=[]))  # type: ignore[arg-type]


def test_sdxl_layout_is_an_addition() -> None:
    """SDXL's UNet (3 levels, attention depth 0/2/10, label embedding) and two text encoders map through the same
    code; the expected LDM blocks are those of SDXL's published diffusers↔LDM conversion."""
    unet_cfg = UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                          num_head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816)
    with torch.device("meta"):
        model = SimpleNamespace(
            family="sdxl", unet=UNetModel(unet_cfg),
            text_encoders=[CLIPTextModel(TextEncoderConfig()),
                           CLIPTextModel(TextEncoderConfig(width=1280, layers=32, heads=20, intermediate=5120,
                                                           activation="gelu", projection_dim=1280, pad_token=0))],
        )
    table = build_target_table(model)  # type: ignore[arg-type]
    expected = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "lora_unet_down_blocks_1_downsamplers_0_conv": "input_blocks.6.0.op",
        "lora_unet_mid_block_attentions_0_transformer_blocks_9_attn2_to_k": "middle_block.1.transformer_blocks.9.attn2.to_k",
        "lora_unet_up_blocks_0_attentions_2_proj_out": "output_blocks.2.1.proj_out",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.2.conv",
        "lora_unet_up_blocks_2_resnets_2_conv1": "output_blocks.8.0.in_layers.2",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
        "lora_unet_add_embedding_linear_1": "label_emb.0.0",
    }
    for key, module in expected.items():
        assert table.resolve(key) == Target("unet", module), key
    assert table.resolve("lora_te1_text_model_encoder_layers_11_mlp_fc1") == Target("text_encoder", "encoder.layers.11.mlp.fc1")
    assert table.resolve("lora_te2_text_model_encoder_layers_31_self_attn_out_proj") == Target(
        "text_encoder_2", "encoder.layers.31.self_attn.out_proj"
    )
    assert table.resolve("text_encoder_2.text_model.encoder.layers.0.mlp.fc2") == Target("text_encoder_2", "encoder.layers.0.mlp.fc2")
    assert table.resolve("lora_te_text_model_encoder_layers_0_mlp_fc1") is None  # SD 1.x spelling
