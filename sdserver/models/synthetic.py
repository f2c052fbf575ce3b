"""Random checkpoints in the original single-file key layout, for tests and benchmarks.

The nn modules are instantiated with their default random init and their keys prefixed as the released
checkpoints prefix them, so these files go through exactly the loader real checkpoints go through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdserver.models.nn.clip import CLIPTextModel
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


def _prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


def _sd1_modules(unet: UNetConfig, vae: VAEConfig, text: TextEncoderConfig) -> list[tuple[torch.nn.Module, str]]:
    return [(UNetModel(unet), UNET_PREFIX), (AutoencoderKL(vae), VAE_PREFIX), (CLIPTextModel(text), "text")]


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
    text_prefix = TEXT_PREFIX if text_model_prefix else TEXT_PREFIX_SHORT
    # A private RNG stream: building fixtures must not shift the global seed other code relies on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = _sd1_modules(unet, vae, text)
    state: dict[str, torch.Tensor] = {}
    for module, prefix in modules:
        state.update(_prefixed(module, text_prefix if prefix == "text" else prefix))
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    if position_ids:
        state[text_prefix + "embeddings.position_ids"] = torch.arange(text.max_positions)[None]
    return state


def stripped_shapes(
    unet: UNetConfig, vae: VAEConfig, text: TextEncoderConfig, *, text_model_prefix: bool = True
) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an SD 1.x checkpoint of these configs, built on the meta device (no data)."""
    text_prefix = TEXT_PREFIX if text_model_prefix else TEXT_PREFIX_SHORT
    with torch.device("meta"):
        modules = _sd1_modules(unet, vae, text)
    shapes: dict[str, tuple[int, ...]] = {}
    for module, prefix in modules:
        for key, value in _prefixed(module, text_prefix if prefix == "text" else prefix).items():
            shapes[key] = tuple(value.shape)
    return shapes


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
