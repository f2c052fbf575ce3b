"""Train the demo model: a tiny Stable Diffusion (KL-VAE, cross-attention UNet, CLIP text encoder) on
procedurally drawn coloured shapes, on CPU.

    python -m sdserver.demo.train [--out PATH] [--threads 2] [--seed 0] [--quick]

Phases: (1) the VAE (MSE + L1 + a tiny KL), (2) latents of a fixed image set encoded once, (3) UNet and text
encoder trained jointly at 64 px, then (4) fine-tuned at 128 px. Epsilon prediction, SD 1.x scaled-linear betas,
10% caption dropout for classifier-free guidance, Min-SNR-5 loss weighting, EMA weights. Deterministic given the
seed and thread count. The result is one fp16 `.safetensors` in the original single-file key layout, with the
architecture in its metadata (`sdserver.config`), so it loads through the same family registry as any SD 1.x file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from sdserver.demo import dataset
from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdserver.models.nn.unet import ResBlock, SpatialTransformer, UNetModel
from sdserver.models.nn.vae import AutoencoderKL
from sdserver.models.tokenizer import CLIPTokenizer

DEFAULT_OUT = Path(__file__).parent / "data" / "sdserver-demo.safetensors"
CONTEXT_TOKENS = 77  # SD's fixed text length: BOS + 75 + EOS
INITIAL_LOGVAR = -8.0


@dataclass(frozen=True)
class Phase:
    steps: int
    batch: int
    lr: float


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    threads: int = 2
    unet: UNetConfig = UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 1),
        transformer_depth_middle=1, num_head_channels=32, context_dim=128,
    )
    # Four channels per GroupNorm group: with one channel per group (instance norm) a flat colour normalises
    # to zero and the decoder can't tell red from blue.
    vae: VAEConfig = VAEConfig(base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=4)
    text: TextEncoderConfig = TextEncoderConfig(width=128, layers=3, heads=4, intermediate=512)
    # At 1e-3 this autoencoder cannot even learn eight flat colours (300 steps: mean error 80/255); at 1e-4
    # it does (7/255). 2e-4 peak with one-cycle annealing.
    vae_phase: Phase = Phase(steps=4000, batch=16, lr=2e-4)
    latent_images_64: int = 30_000
    latent_images_128: int = 10_000
    unet_phase_64: Phase = Phase(steps=3500, batch=32, lr=5e-4)
    unet_phase_128: Phase = Phase(steps=1000, batch=32, lr=2e-4)
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    native_size: int = 128

    def quick(self) -> TrainConfig:
        """A minutes-long run for smoke tests; the model it makes is not meant to be good."""
        return replace(
            self, vae_phase=Phase(40, 8, 2e-4), latent_images_64=64, latent_images_128=32,
            unet_phase_64=Phase(30, 8, 5e-4), unet_phase_128=Phase(10, 4, 2e-4),
        )


def scaled_linear_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD 1.x's noise schedule: betas linear in sqrt space."""
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class Progress:
    """A dependency-free progress bar on stderr, throttled so logs stay small."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.start, self.last = name, total, time.monotonic(), 0.0

    def update(self, done: int, **figures: float) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < 2.0:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        bar = "#" * int(30 * done / self.total)
        extra = " ".join(f"{k}={v:.4f}" for k, v in figures.items())
        print(f"\r{self.name} [{bar:<30}] {done}/{self.total} {elapsed:5.0f}s eta {eta:5.0f}s {extra}", end="", file=sys.stderr)
        if done >= self.total:
            print(file=sys.stderr)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] → float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    rows = []
    for caption in captions:
        ids = [tokenizer.bos_id, *tokenizer.encode(caption)[: CONTEXT_TOKENS - 2], tokenizer.eos_id]
        rows.append(ids + [tokenizer.eos_id] * (CONTEXT_TOKENS - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def train_vae(cfg: TrainConfig, rng: np.random.Generator) -> AutoencoderKL:
    """Trained on whole 64- and 128-px renders (GroupNorm normalises over the whole image, so crops would
    teach it the wrong statistics), two batches in three at 128 px, the size the demo model serves."""
    vae = AutoencoderKL(cfg.vae)
    # Start the posterior nearly deterministic: at the default log-variance 0 the sampling noise swamps the
    # small early means, and a decoder trained through it learns only a few distinguishable colours.
    with torch.no_grad():
        vae.quant_conv.bias[cfg.vae.embed_dim :] = INITIAL_LOGVAR
    phase = cfg.vae_phase
    opt = torch.optim.AdamW(vae.parameters(), lr=phase.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=phase.lr, total_steps=phase.steps, pct_start=0.05)
    bar = Progress("vae", phase.steps)
    for step in range(phase.steps):
        size, batch = (64, phase.batch) if step % 3 == 0 else (128, max(phase.batch * 3 // 8, 1))
        images, _, _ = dataset.sample_batch(batch, size, rng)
        x = to_tensor(images)
        mean, logvar = vae.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = vae.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(step + 1, loss=loss.item())
        if (step + 1) % 500 == 0:
            print(f"\nvae step {step + 1}: colour read right on {vae_colour_accuracy(vae, 128):.0%} of round trips", file=sys.stderr)
    return vae.eval()


@torch.no_grad()
def vae_colour_accuracy(vae: AutoencoderKL, size: int, n: int = 48) -> float:
    """How often the demo classifier reads the right shape colour off a VAE round trip: the cap on what the
    diffusion model can be scored at, so it is worth watching while the VAE trains."""
    from sdserver.demo.classifier import classify

    images, _, scenes = dataset.sample_batch(n, size, np.random.default_rng(12345))
    decoded = vae.decode(vae.encode(to_tensor(images)))
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return sum(classify(p).colour == s.colour for p, s in zip(pixels, scenes)) / n


@torch.no_grad()
def encode_images(vae: AutoencoderKL, count: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    latents, captions = [], []
    bar = Progress(f"encode {size}px", count)
    done = 0
    while done < count:
        n = min(64, count - done)
        images, caps, _ = dataset.sample_batch(n, size, rng)
        latents.append(vae.encode(to_tensor(images)).half())
        captions.extend(caps)
        done += n
        bar.update(done)
    return torch.cat(latents), captions


def min_snr_weights(alphas: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for epsilon prediction: min(SNR, γ) / SNR."""
    snr = alphas / (1.0 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def train_diffusion(
    unet: UNetModel, text: CLIPTextModel, ema: tuple[UNetModel, CLIPTextModel], latents: torch.Tensor,
    tokens: torch.Tensor, empty: torch.Tensor, phase: Phase, cfg: TrainConfig, gen: torch.Generator, name: str,
) -> None:
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.01)
    warmup = max(phase.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / phase.steps, 1.0)))
    )
    alphas_cumprod = scaled_linear_alphas_cumprod()
    bar = Progress(name, phase.steps)
    for step in range(phase.steps):
        idx = torch.randint(0, latents.shape[0], (phase.batch,), generator=gen)
        x0 = latents[idx].float()
        toks = tokens[idx].clone()
        drop = torch.rand(phase.batch, generator=gen) < cfg.caption_dropout
        toks[drop] = empty
        t = torch.randint(0, 1000, (phase.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context, _ = text(toks)
        pred = unet(xt, t.float(), context)
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod[t], cfg.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for live, avg in ((unet, ema[0]), (text, ema[1])):
                for p, q in zip(live.parameters(), avg.parameters()):
                    q.lerp_(p, 1.0 - cfg.ema_decay)
        bar.update(step + 1, loss=loss.item())


def zero_init_outputs(unet: UNetModel) -> UNetModel:
    """The original LDM initialisation: each residual branch's last layer and the output conv start at zero,
    so the freshly built UNet is a stack of identities that trains stably from scratch."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, ResBlock):
                last = module.out_layers[-1]
            elif isinstance(module, SpatialTransformer):
                last = module.proj_out
            else:
                continue
            last.weight.zero_()
            last.bias.zero_()
        unet.out[-1].weight.zero_()
        unet.out[-1].bias.zero_()
    return unet


def latent_scale(latents: torch.Tensor) -> float:
    """1/std of the latents, so the diffusion model sees unit-variance data (SD's 0.18215 was found the same way)."""
    return float(1.0 / latents.float().std())


def export_state_dict(unet: UNetModel, vae: AutoencoderKL, text: CLIPTextModel, used_tokens: set[int]) -> dict[str, torch.Tensor]:
    """Prefix each component with its original single-file name; fp16; untrained token rows zeroed.

    Only the few dozen tokens the captions use are ever trained; zeroing the rest makes the file compress to a
    few MB, and a prompt word the model never saw maps to a neutral vector instead of random noise.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, module in (
        ("model.diffusion_model.", unet), ("first_stage_model.", vae), ("cond_stage_model.transformer.text_model.", text)
    ):
        for key, value in module.state_dict().items():
            out[prefix + key] = value.detach().to(torch.float16).contiguous()
    emb_key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    keep = torch.zeros(out[emb_key].shape[0], dtype=torch.bool)
    keep[sorted(used_tokens)] = True
    out[emb_key] = torch.where(keep[:, None], out[emb_key], torch.zeros_like(out[emb_key]))
    return out


def config_metadata(cfg: TrainConfig, scale: float) -> dict[str, str]:
    configs = {
        "unet": asdict(cfg.unet), "vae": asdict(replace(cfg.vae, scaling_factor=scale)), "text_encoder": asdict(cfg.text),
        "prediction_type": "eps", "default_size": [cfg.native_size, cfg.native_size],
    }
    return {
        "sdserver.config": json.dumps(configs),
        "modelspec.title": "sdserver demo model",
        "modelspec.description": "A tiny SD 1.x-architecture model trained on procedurally drawn coloured shapes.",
        "sdserver.train_config": json.dumps(asdict(cfg)),
    }


def train(cfg: TrainConfig, out: Path, workdir: Path) -> Path:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.load()
    started = time.monotonic()

    # The VAE phase is saved, so a run can resume after it; later phases draw from their own seeded
    # generator, so a resumed run equals an uninterrupted one.
    vae_path = workdir / "vae.pt"
    if vae_path.exists():
        vae = AutoencoderKL(cfg.vae)
        vae.load_state_dict(torch.load(vae_path, weights_only=True))
        vae.eval()
    else:
        vae = train_vae(cfg, rng)
        torch.save(vae.state_dict(), vae_path)
    print(f"vae done at {time.monotonic() - started:.0f}s", file=sys.stderr)
    rng = np.random.default_rng(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)

    lat64, cap64 = encode_images(vae, cfg.latent_images_64, 64, rng)
    lat128, cap128 = encode_images(vae, cfg.latent_images_128, 128, rng)
    scale = latent_scale(lat128)
    lat64, lat128 = lat64 * scale, lat128 * scale
    tok64, tok128 = tokenize(tokenizer, cap64), tokenize(tokenizer, cap128)
    empty = tokenize(tokenizer, [""])[0]
    used = set(torch.cat([tok64.unique(), tok128.unique(), empty.unique()]).tolist())

    unet, text = zero_init_outputs(UNetModel(cfg.unet)), CLIPTextModel(cfg.text)
    ema = (copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False))
    train_diffusion(unet, text, ema, lat64, tok64, empty, cfg.unet_phase_64, cfg, gen, "unet 64px")
    train_diffusion(unet, text, ema, lat128, tok128, empty, cfg.unet_phase_128, cfg, gen, "unet 128px")

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(ema[0], vae, ema[1], used), str(out), metadata=config_metadata(cfg, scale))
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) after {time.monotonic() - started:.0f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=Path("work-demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run")
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, threads=args.threads)
    train(cfg.quick() if args.quick else cfg, args.out, args.workdir)


if __name__ == "__main__":
    main()
