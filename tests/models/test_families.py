"""Family detection on stripped {key: shape} fixtures (no tensor data)."""

import dataclasses

import pytest

from sdserver.errors import ModelLoadError
from sdserver.models.config_metadata import encode_config_metadata
from sdserver.models.families import REGISTRY, detect, family_named
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdserver.models.synthetic import sd15_configs, stripped_shapes

SD15_SHAPES = stripped_shapes(*sd15_configs())


def test_sd15_layout_matches_the_released_checkpoint() -> None:
    """Anchors from the released v1-5 file, independent of this package's code."""
    prefixes = [k.split(".")[0] for k in SD15_SHAPES]
    assert (prefixes.count("model"), prefixes.count("first_stage_model"), prefixes.count("cond_stage_model")) == (
        686,
        248,
        196,
    )
    anchors = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    }
    for key, shape in anchors.items():
        assert SD15_SHAPES[key] == shape, key


def test_sd15_detected_with_its_configs() -> None:
    match = detect(SD15_SHAPES)
    unet, vae, text = sd15_configs()
    assert match.family.name == "sd1"
    assert match.spec.unet == unet and match.spec.vae == vae and match.spec.text_encoders == (text,)
    assert match.spec.prediction_type == "eps" and match.spec.default_size == (512, 512)
    assert not match.spec.is_inpainting


def test_sd15_inpainting_detected() -> None:
    shapes = stripped_shapes(*sd15_configs(inpainting=True))
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)
    match = detect(shapes)
    assert match.family.name == "sd1" and match.spec.is_inpainting and match.spec.unet.in_channels == 9


def test_text_encoder_without_text_model_level() -> None:
    shapes = stripped_shapes(*sd15_configs(), text_model_prefix=False)
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in shapes
    match = detect(shapes)
    assert match.spec.text_encoders == (sd15_configs()[2],)
    parts = match.family.split(shapes)
    assert parts["text_encoder"].prefix == "cond_stage_model.transformer."
    assert "encoder.layers.0.mlp.fc1.weight" in parts["text_encoder"]


def test_non_standard_sizes_are_derived() -> None:
    unet = UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 3),
        num_res_blocks=3,
        transformer_depth=(0, 2, 1),
        transformer_depth_middle=0,
        context_dim=96,
    )
    vae = VAEConfig(base_channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=6,
                    mid_attention=False)
    text = TextEncoderConfig(width=128, layers=3, heads=2, intermediate=200, max_positions=80, vocab_size=1000)
    spec = detect(stripped_shapes(unet, vae, text)).spec
    assert spec.unet == unet and spec.vae == vae and spec.text_encoders == (text,)


def test_linear_projections_are_detected() -> None:
    unet = dataclasses.replace(sd15_configs()[0], use_linear_in_transformer=True)
    assert detect(stripped_shapes(unet, *sd15_configs()[1:])).spec.unet.use_linear_in_transformer


def test_metadata_overrides_heads_size_and_prediction() -> None:
    unet, vae, text = sd15_configs()
    metadata = encode_config_metadata(
        dataclasses.replace(unet, num_heads=4),
        dataclasses.replace(vae, scaling_factor=0.5),
        dataclasses.replace(text, heads=3),
        prediction_type="v",
        default_size=(128, 96),
    )
    spec = detect(SD15_SHAPES, metadata).spec
    assert spec.unet.num_heads == 4 and spec.vae.scaling_factor == 0.5 and spec.text_encoders[0].heads == 3
    assert spec.prediction_type == "v" and spec.default_size == (128, 96)
    assert spec.unet.channel_mult == (1, 2, 4, 4)  # lists in JSON come back as tuples


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"unet": {"num_hedas": 4}}', "num_hedas"),
        ('{"prediction_type": "x0"}', "x0"),
        ('{"default_size": [1, 2, 3]}', "default_size"),
    ],
)
def test_bad_metadata_is_refused_naming_the_problem(raw: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        detect(SD15_SHAPES, {"sdserver.config": raw})


def test_unknown_layouts_are_refused() -> None:
    with pytest.raises(ModelLoadError, match="known model family"):
        detect({"foo.weight": (3, 3)})
    pix2pix = dict(SD15_SHAPES)
    pix2pix["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(ModelLoadError, match="known model family.*8 input channels"):
        detect(pix2pix)
    sdxl_like = dict(SD15_SHAPES)
    sdxl_like["model.diffusion_model.label_emb.0.0.weight"] = (1280, 2816)
    with pytest.raises(ModelLoadError):
        detect(sdxl_like)


def test_missing_structural_tensor_is_named() -> None:
    shapes = dict(SD15_SHAPES)
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(ModelLoadError, match="out.2.weight"):
        detect(shapes)


def test_registry_lookup() -> None:
    assert family_named("sd1").name == "sd1" and family_named("sd1") in REGISTRY
    with pytest.raises(ModelLoadError, match="sdxxl"):
        family_named("sdxxl")


@pytest.mark.parametrize(
    ("shapes", "hint"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "VAE"),
        ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers"),
        ({"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "refiner"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "no known text encoder"),
    ],
)
def test_unknown_files_get_a_hint(shapes: dict[str, tuple[int, ...]], hint: str) -> None:
    with pytest.raises(ModelLoadError, match=hint):
        detect(shapes)
