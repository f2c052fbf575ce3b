"""The refiner's switch rule and conditioning as pure pieces: A1111's completed ratio, the switching
denoiser, the refiner's per-prompt vector, the prompt schedule continuing across the switch."""

from __future__ import annotations

from pathlib import Path

import torch

from sdserver.engine.refiner import (
    ModelSlot, RefinerJob, SwitchingDenoiser, SwitchRule, completed_ratio, refiner_guidance,
)
from sdserver.engine.types import GenerationRequest, RefinerParams, SamplingParams
from sdserver.models.family_sdxl import refiner_vector
from sdserver.models.loader import load_checkpoint
from sdserver.models.sd_model import sd_alphas_cumprod
from sdserver.models.synthetic import random_state_dict, save_checkpoint, tiny_sdxl_configs, tiny_sdxl_refiner_configs
from sdserver.models.tokenizer import CLIPTokenizer
from sdserver.pipeline.cfg import Guidance
from sdserver.pipeline.conditioning import (
    ConditioningOptions, PromptConditioning, ScheduledConditioning, TextConditioning, TextEncoderCache,
)
from sdserver.sampling.discrete import DiscreteSchedule

SIGMAS = DiscreteSchedule(sd_alphas_cumprod()).sigmas


def test_completed_ratio_reads_the_nearest_timestep_or_counts_calls() -> None:
    assert completed_ratio(SIGMAS[999], 0, 10, SIGMAS, False) == 0.0
    assert completed_ratio(SIGMAS[199], 0, 10, SIGMAS, False) == 0.8
    # A level between two timesteps takes the nearer one; a batch takes its largest sigma.
    between = SIGMAS[500] * 0.9 + SIGMAS[501] * 0.1
    assert completed_ratio(torch.stack([between, SIGMAS[10]]), 0, 10, SIGMAS, False) == (999 - 500) / 1000
    assert completed_ratio(SIGMAS[999], 7, 20, SIGMAS, True) == 0.35


class Fake:
    def __init__(self, label: str, log: list[str]) -> None:
        self.label, self.log = label, log

    def __call__(self, x, sigma, **extra):  # type: ignore[no-untyped-def]
        self.log.append(self.label)
        return x

    def denoise_with_uncond(self, x, sigma, *, cond_scale_multiplier=1.0, **extra):  # type: ignore[no-untyped-def]
        self.log.append(f"{self.label}*{cond_scale_multiplier}")
        return x, x


def test_switching_denoiser_switches_once_at_the_rule() -> None:
    log: list[str] = []
    switches: list[int] = []

    class Model:
        alphas_cumprod = sd_alphas_cumprod()

    def switch(calls: int):  # type: ignore[no-untyped-def]
        switches.append(calls)
        return Model(), Fake("refiner", log)

    denoiser = SwitchingDenoiser(Fake("base", log), Model(), SwitchRule(0.5, True, 4), switch)  # type: ignore[arg-type]
    x = torch.zeros(1, 4, 2, 2)
    for _ in range(3):
        denoiser(x, SIGMAS[900][None])
    denoiser.denoise_with_uncond(x, SIGMAS[900][None], cond_scale_multiplier=0.08)
    assert log == ["base", "base", "refiner", "refiner*0.08"] and switches == [2] and denoiser.switched_at == 2
    never = SwitchingDenoiser(Fake("base", log), Model(), None, switch)  # type: ignore[arg-type]
    never(x, SIGMAS[0][None])
    assert never.switched_at is None and switches == [2]


def _conditioning(value: float) -> PromptConditioning:
    entry = TextConditioning(torch.full((77, 8), value), torch.full((4,), value))
    return PromptConditioning((ScheduledConditioning(((10, entry),)),))


def test_refiner_guidance_puts_each_prompts_own_vector_in_place_of_the_pooled_text() -> None:
    guidance = Guidance((_conditioning(1.0),), (_conditioning(2.0),), 7.0)
    out = refiner_guidance(guidance, ("blurry",), 96, 64, 6.0, 2.5)
    cond, uncond = out.conds[0].parts[0].at(0), out.unconds[0].parts[0].at(0)
    torch.testing.assert_close(cond.pooled, refiner_vector(torch.full((4,), 1.0), 96, 64, 6.0))
    torch.testing.assert_close(uncond.pooled, refiner_vector(torch.full((4,), 2.0), 96, 64, 2.5))
    assert float(uncond.context[0, 0]) == 2.0 and out.cfg_scale == 7.0
    # Every negative prompt empty (tags and comments aside): sgm's zeroed text embeddings, size/score kept.
    empty = refiner_guidance(guidance, ("<lora:x:1>",), 96, 64, 6.0, 2.5).unconds[0].parts[0].at(0)
    assert not empty.context.any()
    torch.testing.assert_close(empty.pooled, refiner_vector(torch.zeros(4), 96, 64, 2.5))


def test_prompt_schedule_goes_on_across_the_switch(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.load()
    base = load_checkpoint(save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs(), seed=1),
                                           tmp_path / "b.safetensors"), torch.float32, "cpu", tokenizer)
    refiner = load_checkpoint(save_checkpoint(random_state_dict("sdxl_refiner", tiny_sdxl_refiner_configs(), seed=2),
                                              tmp_path / "r.safetensors"), torch.float32, "cpu", tokenizer)
    options = ConditioningOptions()
    job = RefinerJob(ModelSlot(base, TextEncoderCache(base, options)), RefinerParams("r", 0.5, True),
                     lambda: ModelSlot(refiner, TextEncoderCache(refiner, options)))
    request = GenerationRequest(prompt="[a cat:a dog:3]", sampling=SamplingParams(steps=4))
    denoiser = job.denoiser(request, (request.prompt,), ("",), 64, 64, 4, lambda _m: None, lambda _m, cfg: cfg)
    x = torch.randn(1, 4, 8, 8)
    for i in range(4):
        denoiser(x, SIGMAS[900 - 200 * i][None])
    assert denoiser.switched_at == 2 and denoiser.model is refiner and job.used
    # The refiner's guided denoiser counts on from the base's step: the schedule switches text at step 3.
    assert denoiser.current.step == 4  # type: ignore[attr-defined]
    entries = denoiser.current.guidance.conds[0].parts[0].entries  # type: ignore[attr-defined]
    assert [end for end, _ in entries] == [3, 4]
    assert entries[0][1].pooled.shape == (64 + 5 * 256,)
