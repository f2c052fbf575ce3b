"""Seconds per sampling step for SD 1.5-sized random weights at 512x512 with CFG, sdserver vs plain diffusers.

    pip install -e ".[bench]"
    python benchmarks/bench_sd15.py [--steps 4] [--size 512] [--threads 2]

Builds a random checkpoint of the released SD 1.5 shapes (no download), runs sdserver's txt2img pipeline in
fp32 and in its default precision for this machine, and diffusers' StableDiffusionPipeline (fp32, random
UNet/VAE of the same config, prompt embeddings passed directly) with an Euler scheduler, in one process.
The first step of each run is warm-up and is left out of the figure.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


class StepTimer:
    """A JobControl that timestamps every sampler step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def begin_pass(self, batch_index: int, batch_count: int, steps: int) -> None:
        self.times.append(time.perf_counter())

    def step(self, step: int, preview) -> None:  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter())

    def wants_preview(self, step: int) -> bool:
        return False

    def seconds_per_step(self) -> float:
        deltas = [b - a for a, b in zip(self.times, self.times[1:])][1:]
        return sum(deltas) / len(deltas)


def bench_sdserver(dtype: torch.dtype, steps: int, size: int) -> float:
    from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
    from sdserver.models.build import build_model
    from sdserver.models.families import detect
    from sdserver.models.synthetic import random_sd1_state_dict, sd15_configs
    from sdserver.pipeline.txt2img import txt2img

    unet, vae, text = sd15_configs()
    state = random_sd1_state_dict(unet=unet, vae=vae, text=text, seed=0)
    match = detect({k: tuple(v.shape) for k, v in state.items()}, {})
    model = build_model(state, match, dtype, torch.device("cpu"))
    del state
    request = GenerationRequest(
        prompt="a photograph of an astronaut riding a horse", width=size, height=size,
        sampling=SamplingParams(sampler="euler", scheduler="automatic", steps=steps, cfg_scale=7.0),
        seeds=SeedParams(seed=1),
    )
    timer = StepTimer()
    txt2img(model, request, timer)
    del model
    gc.collect()
    return timer.seconds_per_step()


def bench_diffusers(steps: int, size: int) -> float:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    times: list[float] = []

    def on_step(pipeline, i, t, kwargs):  # type: ignore[no-untyped-def]
        times.append(time.perf_counter())
        return kwargs

    embeds = torch.randn(1, 77, 768)
    times.append(time.perf_counter())
    pipe(
        prompt_embeds=embeds, negative_prompt_embeds=torch.randn(1, 77, 768), height=size, width=size,
        num_inference_steps=steps, guidance_scale=7.0, callback_on_step_end=on_step, output_type="np",
    )
    deltas = [b - a for a, b in zip(times, times[1:])][1:]
    return sum(deltas) / len(deltas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sdserver.engine.devices import cpu_has_native_bf16, pick_dtype

    default = pick_dtype(torch.device("cpu"), "autocast", False, cpu_has_native_bf16())
    print(f"SD 1.5 shapes, {args.size}x{args.size}, CFG 7 (batch 2 per step), {args.steps} steps, {args.threads} threads")
    rows = [("sdserver fp32", bench_sdserver(torch.float32, args.steps, args.size))]
    if default != torch.float32:
        rows.append((f"sdserver default ({str(default).removeprefix('torch.')})", bench_sdserver(default, args.steps, args.size)))
    rows.append(("diffusers StableDiffusionPipeline fp32", bench_diffusers(args.steps, args.size)))
    for name, seconds in rows:
        print(f"{name:45s} {seconds:7.2f} s/step")


if __name__ == "__main__":
    main()
