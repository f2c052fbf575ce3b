"""Random checkpoints in the original single-file key layout, for tests and benchmarks.

The nn modules are instantiated with their default random init and their keys prefixed as the released
checkpoints prefix them, so these files go through exactly the loader real checkpoints go through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.openclip import hf_to_openclip
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdserver.models.nn.unet import UNetModel
from sdserver.models.nn.vae import AutoencoderKL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_PREFIX_SHORT = "cond_stage_model.transformer."
SD1Configs = tuple[UNetConfig, VAEConfig, TextEncoderConfig]


def tiny_sd1_configs(*, inpainting: bool = False) -> SD1Configs:
    """Tiny widths that still have every block type: res blocks with and without skip convs, attention
    at every level and in the middle, down/upsampling, an 8x VAE with mid attention, a 2-layer text encoder."""
    unet = UNetConfig(
        in_channels=9 if inpainting else 4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        transformer_depth=(1, 1),
        context_dim=32,
    )
    vae = VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)
    text = TextEncoderConfig(width=32, layers=2, heads=1, intermediate=64)
    return unet, vae, text


def sd15_configs(*, inpainting: bool = False) -> SD1Configs:
    """The released SD 1.5 sizes."""
    return UNetConfig(in_channels=9 if inpainting else 4), VAEConfig(), TextEncoderConfig()


def sd21_configs(*, inpainting: bool = False) -> SD1Configs:
    """The released SD 2.1 sizes (the same for 512-base and 768-v)."""
    unet = UNetConfig(
        in_channels=9 if inpainting else 4,
        num_heads=-1,
        num_head_channels=64,
        context_dim=1024,
        use_linear_in_transformer=True,
    )
    text = TextEncoderConfig(width=1024, layers=24, heads=16, intermediate=4096, activation="gelu", pad_token=0)
    return unet, VAEConfig(), text


def tiny_sd2_configs() -> SD1Configs:
    """Tiny SD 2.x: widths of 64 so the 64-channel head rule still gives whole heads."""
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                      num_heads=-1, num_head_channels=64, context_dim=64, use_linear_in_transformer=True)
    vae = tiny_sd1_configs()[1]
    text = TextEncoderConfig(width=64, layers=2, heads=1, intermediate=128, activation="gelu", pad_token=0)
    return unet, vae, text


SDXLConfigs = tuple[UNetConfig, VAEConfig, TextEncoderConfig, TextEncoderConfig]


def sdxl_configs(*, inpainting: bool = False) -> SDXLConfigs:
    """The released SDXL base sizes (`inpainting`: the 9-channel SDXL inpainting UNet)."""
    unet = UNetConfig(
        in_channels=9 if inpainting else 4,
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 2, 10),
        transformer_depth_middle=10,
        num_heads=-1,
        num_head_channels=64,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    )
    vae = VAEConfig(scaling_factor=0.13025)
    big_g = TextEncoderConfig(width=1280, layers=32, heads=20, intermediate=5120, activation="gelu",
                              projection_dim=1280, pad_token=0)
    return unet, vae, TextEncoderConfig(), big_g


def tiny_sdxl_configs(*, inpainting: bool = False) -> SDXLConfigs:
    clip_l = TextEncoderConfig(width=32, layers=2, heads=1, intermediate=64)
    big_g = TextEncoderConfig(width=64, layers=2, heads=1, intermediate=128, activation="gelu", projection_dim=64,
                              pad_token=0)
    unet = UNetConfig(in_channels=9 if inpainting else 4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
                      num_heads=-1, num_head_channels=64, context_dim=clip_l.width + big_g.width,
                      use_linear_in_transformer=True, adm_in_channels=big_g.projection_dim + 6 * 256)
    vae = VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=0.13025)
    return unet, vae, clip_l, big_g


RefinerConfigs = tuple[UNetConfig, VAEConfig, TextEncoderConfig]
# The refiner's vector: pooled bigG, then original size (2), crop (2) and aesthetic score (1), 256 each.
_REFINER_ADM_NUMBERS = 5


def sdxl_refiner_configs() -> RefinerConfigs:
    """The released SDXL refiner sizes (sd_xl_refiner.yaml): attention at levels 1 and 2 and in the middle,
    depth 4, bigG's 1280-wide penultimate layer as context."""
    unet = UNetConfig(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(0, 4, 4, 0),
        transformer_depth_middle=4,
        num_heads=-1,
        num_head_channels=64,
        context_dim=1280,
        use_linear_in_transformer=True,
        adm_in_channels=1280 + _REFINER_ADM_NUMBERS * 256,
    )
    big_g = sdxl_configs()[3]
    return unet, VAEConfig(scaling_factor=0.13025), big_g


def tiny_sdxl_refiner_configs() -> RefinerConfigs:
    """A tiny refiner whose bigG matches tiny_sdxl_configs()'s, so base and refiner share one tokenizer."""
    big_g = tiny_sdxl_configs()[3]
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                      transformer_depth_middle=1, num_heads=-1, num_head_channels=64, context_dim=big_g.width,
                      use_linear_in_transformer=True,
                      adm_in_channels=big_g.projection_dim + _REFINER_ADM_NUMBERS * 256)
    return unet, tiny_sdxl_configs()[1], big_g


def _prefixed(entries: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in entries.items()}


def _openclip_layout(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """OpenCLIP's original keys, with the extras real files carry (a projection even where unused, the
    contrastive temperature)."""
    entries = hf_to_openclip(model.state_dict())
    width = model.config.width
    entries.setdefault("text_projection", torch.randn(width, width) * width**-0.5)
    entries["logit_scale"] = torch.tensor(4.6052)
    return entries


def _layout(family: str, configs: tuple, text_model_prefix: bool) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    """Every tensor of a fresh model of `configs`, keyed as a `family` single-file checkpoint."""
    unet, vae, *texts = configs
    state = _prefixed(UNetModel(unet).state_dict(), UNET_PREFIX)
    state.update(_prefixed(AutoencoderKL(vae).state_dict(), VAE_PREFIX))
    if family == "sd1":
        text_prefix = TEXT_PREFIX if text_model_prefix else TEXT_PREFIX_SHORT
        state.update(_prefixed(CLIPTextModel(texts[0]).state_dict(), text_prefix))
    elif family == "sd2":
        state.update(_prefixed(_openclip_layout(CLIPTextModel(texts[0])), "cond_stage_model.model."))
    elif family == "sdxl":
        clip_l = "conditioner.embedders.0.transformer." + ("text_model." if text_model_prefix else "")
        state.update(_prefixed(CLIPTextModel(texts[0]).state_dict(), clip_l))
        state.update(_prefixed(_openclip_layout(CLIPTextModel(texts[1])), "conditioner.embedders.1.model."))
    elif family == "sdxl_refiner":
        state.update(_prefixed(_openclip_layout(CLIPTextModel(texts[0])), "conditioner.embedders.0.model."))
    else:
        raise ValueError(f"unknown family '{family}'")
    return state


def random_state_dict(
    family: str,
    configs: tuple,  # type: ignore[type-arg]
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    text_model_prefix: bool = True,
) -> dict[str, torch.Tensor]:
    """A random checkpoint of `family` ("sd1", "sd2", "sdxl", "sdxl_refiner") in the original single-file
    layout."""
    # A private RNG stream: building fixtures must not shift the global seed other code relies on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = _layout(family, configs, text_model_prefix)
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


def random_sd1_state_dict(
    unet: UNetConfig,
    vae: VAEConfig,
    text: TextEncoderConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    text_model_prefix: bool = True,
    position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """A random SD 1.x checkpoint state dict. `text_model_prefix=False` gives the variant without HF's
    `text_model.` level; `position_ids` adds the buffer many real checkpoints carry."""
    state = random_state_dict("sd1", (unet, vae, text), seed=seed, dtype=dtype, text_model_prefix=text_model_prefix)
    if position_ids:
        prefix = TEXT_PREFIX if text_model_prefix else TEXT_PREFIX_SHORT
        state[prefix + "embeddings.position_ids"] = torch.arange(text.max_positions)[None]
    return state


def family_shapes(
    family: str,
    configs: tuple,  # type: ignore[type-arg]
    *,
    text_model_prefix: bool = True,
) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a `family` checkpoint of these configs, built on the meta device (no data)."""
    with torch.device("meta"):
        state = _layout(family, configs, text_model_prefix)
    return {k: tuple(v.shape) for k, v in state.items()}


def stripped_shapes(
    unet: UNetConfig, vae: VAEConfig, text: TextEncoderConfig, *, text_model_prefix: bool = True
) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an SD 1.x checkpoint of these configs, built on the meta device (no data)."""
    return family_shapes("sd1", (unet, vae, text), text_model_prefix=text_model_prefix)


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `.safetensors` (with metadata) or `.ckpt` (an LDM-style {"state_dict": ...} through torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)
    elif path.suffix == ".ckpt":
        if metadata:
            raise ValueError(".ckpt files can't carry metadata; save as .safetensors")
        torch.save({"state_dict": state_dict}, path)
    else:
        raise ValueError(f"unknown checkpoint suffix '{path.suffix}': use .safetensors or .ckpt")
    return path
