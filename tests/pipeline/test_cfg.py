"""CFG denoiser details checked against A1111 1.10 (benchmarks/a1111_parity.py): where s_min_uncond looks and
how inpainting blends for each sampler kind."""

from __future__ import annotations

import pytest
import torch

from sdserver.pipeline.cfg import CFGDenoiser, Guidance, InputMaskedDenoiser, OutputMaskedDenoiser
from sdserver.pipeline.conditioning import PromptConditioning, ScheduledConditioning, TextConditioning
from sdserver.pipeline.denoise import masked_denoiser
from sdserver.sampling import run
from sdserver.sampling.discrete import DiscreteSchedule
from sdserver.sampling.samplers_timestep import eps_at_timestep


def _prompt(value: float) -> PromptConditioning:
    return PromptConditioning((ScheduledConditioning(((1000, TextConditioning(torch.full((2, 3), value), None)),)),))


class RowRecorder:
    """A UNet-side denoiser whose output is the row's context value: records how many rows each call ran."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, **extra) -> torch.Tensor:  # type: ignore[no-untyped-def]
        self.rows.append(x.shape[0])
        return context[:, :1, :1].reshape(-1, 1, 1, 1).expand_as(x).clone()


@pytest.fixture
def schedule() -> DiscreteSchedule:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteSchedule(torch.cumprod(1 - betas, dim=0).float())


def _cfg(level, s_min_uncond: float = 5.0) -> tuple[CFGDenoiser, RowRecorder]:  # type: ignore[no-untyped-def]
    inner = RowRecorder()
    guidance = Guidance((_prompt(1.0),), (_prompt(0.0),), cfg_scale=3.0, s_min_uncond=s_min_uncond)
    return CFGDenoiser(inner, guidance, skip_level=level), inner


def test_k_samplers_skip_the_negative_prompt_below_s_min_uncond_on_odd_calls(schedule: DiscreteSchedule) -> None:
    cfg, inner = _cfg(run.uncond_skip_level("euler", schedule))
    x, sigma = torch.zeros(1, 4, 2, 2), torch.tensor([0.5])
    first, second = cfg(x, sigma), cfg(x, sigma)
    assert inner.rows == [2, 1]  # the second (odd) call runs the prompt alone
    assert torch.allclose(first, torch.full_like(x, 3.0)) and torch.allclose(second, torch.full_like(x, 1.0))


@pytest.mark.parametrize("sampler", ("ddim", "plms", "unipc"))
def test_timestep_samplers_compare_s_min_uncond_with_the_timestep(schedule: DiscreteSchedule, sampler: str) -> None:
    # sigma 0.5 is timestep ~200: above a sigma-sized threshold of 5 in timestep units, so A1111 keeps CFG.
    cfg, inner = _cfg(run.uncond_skip_level(sampler, schedule))
    x, sigma = torch.zeros(1, 4, 2, 2), torch.tensor([0.5])
    cfg(x, sigma), cfg(x, sigma)
    assert inner.rows == [2, 2]
    cfg, inner = _cfg(run.uncond_skip_level(sampler, schedule), s_min_uncond=500.0)
    cfg(x, sigma), cfg(x, sigma)
    assert inner.rows == [2, 1]


class Recorder:
    """Denoiser with a known answer that records the latent it was called with."""

    prediction = "v"

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:  # type: ignore[no-untyped-def]
        self.seen.append(x.clone())
        return 0.25 * x

    def denoise_with_uncond(self, x, sigma, *, cond_scale_multiplier=1.0, **extra):  # type: ignore[no-untyped-def]
        self.seen.append(x.clone())
        return 0.25 * x, 0.5 * x


def _mask() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    init = torch.full((1, 1, 2, 2), 2.0)
    keep = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    return init, keep, 1 - keep


def test_timestep_inpainting_blends_the_unet_input_and_hands_back_its_eps(schedule: DiscreteSchedule) -> None:
    init, keep, regen = _mask()
    inner = Recorder()
    masked = InputMaskedDenoiser(inner, init, keep, regen)
    x_vp = torch.full((1, 1, 2, 2), -1.0)
    t = 400
    eps = eps_at_timestep(masked, x_vp, t, schedule, {})
    scale = (schedule.sigmas[t] ** 2 + 1) ** 0.5
    blended_vp = x_vp * regen + init * keep  # the VP latent A1111's CFG denoiser hands the UNet
    assert torch.allclose(inner.seen[0] / scale, blended_vp, atol=1e-6)
    # eps of the blended latent, as the UNet gave it: (x_ve' - 0.25 x_ve') / sigma
    assert torch.allclose(eps, 0.75 * blended_vp * scale / schedule.sigmas[t], atol=1e-5)
    assert masked.prediction == "v"


def test_timestep_inpainting_shifts_both_cfgpp_branches(schedule: DiscreteSchedule) -> None:
    init, keep, regen = _mask()
    masked = InputMaskedDenoiser(Recorder(), init, keep, regen)
    x, sigma = torch.full((1, 1, 2, 2), -3.0), torch.tensor([2.0])
    guided, uncond = masked.denoise_with_uncond(x, sigma, cond_scale_multiplier=0.08)
    blended = masked._blend(x, sigma)
    assert torch.allclose(x - guided, 0.75 * blended) and torch.allclose(x - uncond, 0.5 * blended)


def test_k_sampler_inpainting_blends_the_denoised_value() -> None:
    init, keep, regen = _mask()
    inner = Recorder()
    masked = OutputMaskedDenoiser(inner, init, keep, regen)
    x = torch.full((1, 1, 2, 2), -4.0)
    out = masked(x, torch.tensor([3.0]))
    assert torch.equal(inner.seen[0], x)
    assert torch.allclose(out, -1.0 * regen + 2.0 * keep)


@pytest.mark.parametrize(("sampler", "kind"), [("ddim", InputMaskedDenoiser), ("ddim_cfgpp", InputMaskedDenoiser),
                                               ("plms", InputMaskedDenoiser), ("unipc", InputMaskedDenoiser),
                                               ("euler", OutputMaskedDenoiser), ("lcm", OutputMaskedDenoiser)])
def test_masked_denoiser_picks_a1111s_blend_per_sampler_kind(sampler: str, kind: type) -> None:
    init, keep, regen = _mask()
    assert isinstance(masked_denoiser(Recorder(), sampler, init, keep, regen), kind)  # type: ignore[arg-type]
