"""`SDModel`: a loaded checkpoint's modules plus the facts the pipeline needs about them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sdserver.models.family_base import ModelSpec
from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.layers import timestep_embedding
from sdserver.models.nn.unet import UNetModel
from sdserver.models.nn.vae import AutoencoderKL
from sdserver.models.tokenizer import CLIPTokenizer

# SD's training schedule ("scaled linear"): betas linear in sqrt space from 0.00085 to 0.012 over 1000 steps.
_BETA_START, _BETA_END, _TRAIN_STEPS = 0.00085, 0.012, 1000
_ZTSNR_LAST = 4.8973451890853435e-08  # A1111's stand-in for 0: sigma_max ≈ 4500 instead of infinity
_SIZE_EMBED_DIM = 256  # SDXL's per-number size/crop embedding width (2816 = 1280 pooled + 6 x 256)


def repad(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """`tokens` with every position after each row's first EOS set to `pad_id`."""
    if pad_id == eos_id:
        return tokens
    is_eos = tokens == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), tokens.shape[1])
    after = torch.arange(tokens.shape[1], device=tokens.device)[None] > first[:, None]
    return torch.where(after, torch.full_like(tokens, pad_id), tokens)


def sd_alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    """Cumulative alphas of SD's training schedule, computed in float64 and stored as float32 like LDM does.

    `zero_terminal_snr` rescales them so the last step is pure noise (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"), for models trained that way; the last value is then set to a tiny
    positive number, as A1111 does, so the largest sigma stays finite."""
    betas = torch.linspace(_BETA_START**0.5, _BETA_END**0.5, _TRAIN_STEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    if zero_terminal_snr:
        # In float32, on the float32 table, as A1111 rescales it.
        root = alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        alphas_cumprod = root**2
        alphas_cumprod[-1] = _ZTSNR_LAST
    return alphas_cumprod


@dataclass(frozen=True)
class TextEncoding:
    context: torch.Tensor  # [B, T, D] cross-attention context, float32
    pooled: torch.Tensor | None  # [B, P] pooled text embedding where the family uses it (SDXL), else None


class SDModel(nn.Module):
    """UNet, VAE and text encoder(s) of one checkpoint. Inputs are moved to the model's device and dtype
    inside each method; outputs come back as float32."""

    def __init__(
        self,
        spec: ModelSpec,
        unet: UNetModel,
        vae: AutoencoderKL,
        text_encoders: list[CLIPTextModel],
        tokenizer: CLIPTokenizer,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.unet = unet
        self.vae = vae
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizer = tokenizer
        # A plain attribute, not a buffer: samplers read it on the CPU whatever the model's device.
        self.alphas_cumprod = sd_alphas_cumprod(spec.zero_terminal_snr)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def prediction_type(self) -> str:
        return self.spec.prediction_type

    @property
    def is_inpainting(self) -> bool:
        return self.spec.is_inpainting

    @property
    def default_size(self) -> tuple[int, int]:
        return self.spec.default_size

    @property
    def latent_channels(self) -> int:
        return self.spec.vae.embed_dim

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell along each side (8 for every released SD model)."""
        return self.spec.vae.downscale

    @property
    def scaling_factor(self) -> float:
        return self.spec.vae.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    def encode_tokens(
        self,
        tokens: torch.Tensor,
        clip_skip: int = 1,
        token_embeds: Sequence[torch.Tensor | None] | None = None,
    ) -> TextEncoding:
        """Cross-attention context of `tokens` ([B, T] ids, BOS ... EOS then padding); clip_skip=2 takes the
        penultimate layer. Families that always use a fixed layer (SD 2.x, SDXL) ignore `clip_skip`; each text
        encoder gets its own padding after the first EOS (CLIP-L pads with EOS, OpenCLIP with 0).
        `token_embeds`, one entry per text encoder, replaces that encoder's token-embedding lookup ([B, T, D],
        for textual inversion); None entries use the lookup."""
        tokens = tokens.to(self.device, torch.long)
        layer = self.spec.fixed_text_layer or clip_skip
        embeds = list(token_embeds) if token_embeds is not None else [None] * len(self.text_encoders)
        if len(embeds) != len(self.text_encoders):
            raise ValueError(f"token_embeds has {len(embeds)} entries for {len(self.text_encoders)} text encoders")
        contexts, pooled = [], None
        for encoder, embed in zip(self.text_encoders, embeds):
            padded = repad(tokens, self.tokenizer.eos_id, encoder.config.pad_token)
            hidden, pooled = encoder(
                padded,
                layer,
                final_norm=self.spec.final_layer_norm,
                token_embeds=None if embed is None else embed.to(self.device),
            )
            contexts.append(hidden.float())
        context = torch.cat(contexts, dim=-1) if len(contexts) > 1 else contexts[0]
        return TextEncoding(context, pooled.float() if self.spec.uses_pooled and pooled is not None else None)

    def vector_conditioning(
        self,
        pooled: torch.Tensor,
        width: int,
        height: int,
        *,
        crop_top: int = 0,
        crop_left: int = 0,
        target_width: int | None = None,
        target_height: int | None = None,
    ) -> torch.Tensor:
        """SDXL's `y`: the pooled text embedding ([P] or [B, P]) followed by sinusoidal embeddings of the
        original (height, width), the crop's (top, left) and the target (height, width), 256 channels per
        number, as SDXL was trained. The target defaults to the original size. float32, on the CPU."""
        numbers = torch.tensor(
            [height, width, crop_top, crop_left, target_height or height, target_width or width], dtype=torch.float32
        )
        sizes = timestep_embedding(numbers, _SIZE_EMBED_DIM).reshape(-1)
        pooled = pooled.detach().float().cpu()
        if pooled.ndim == 1:
            return torch.cat([pooled, sizes])
        return torch.cat([pooled, sizes.expand(pooled.shape[0], -1)], dim=1)

    def apply_unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction for latents `x` at timesteps `t`; `concat` adds inpainting channels."""
        if concat is not None:
            x = torch.cat([x, concat.to(x.device, x.dtype)], dim=1)
        device, dtype = self.device, self.dtype
        out = self.unet(
            x.to(device, dtype),
            t.to(device),
            context.to(device, dtype),
            None if y is None else y.to(device, dtype),
        )
        return out.float()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled latent (posterior mean × scaling factor) of images in [-1, 1], [B, 3, H, W]."""
        vae_param = self.vae.quant_conv.weight
        mean = self.vae.encode(image.to(vae_param.device, vae_param.dtype))
        return mean.float() * self.scaling_factor

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from scaled latents."""
        vae_param = self.vae.quant_conv.weight
        z = (latent.float() / self.scaling_factor).to(vae_param.device, vae_param.dtype)
        return self.vae.decode(z).float()
