"""A1111 1.10 behaviours found by running A1111's own sampling code (benchmarks/a1111_parity.py), pinned with
small analytic cases so these tests need no A1111."""

from __future__ import annotations

import pytest
import torch

from sdserver.sampling import run
from sdserver.sampling.discrete import Denoiser, DiscreteSchedule
from sdserver.sampling.unipc import NoiseScheduleVP, eps_from_v_truncated, sample_unipc, v_from_denoised

TIMESTEP_SAMPLERS = ("ddim", "ddim_cfgpp", "plms", "unipc")


@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
def test_timestep_samplers_compare_s_min_uncond_with_the_timestep(schedule: DiscreteSchedule, sampler: str) -> None:
    level = run.uncond_skip_level(sampler, schedule)
    sigmas = schedule.sigmas[torch.tensor([1, 126, 501, 876])]
    assert torch.allclose(level(sigmas), torch.tensor([1.0, 126.0, 501.0, 876.0]), atol=1e-3)
    # UniPC calls at fractional timesteps; the level is that fractional timestep.
    assert level(schedule.t_to_sigma(torch.tensor([250.25]))).item() == pytest.approx(250.25, abs=1e-2)


@pytest.mark.parametrize("sampler", ("euler", "dpmpp_2m", "lcm"))
def test_k_samplers_compare_s_min_uncond_with_sigma(schedule: DiscreteSchedule, sampler: str) -> None:
    sigmas = torch.tensor([0.03, 1.5, 14.6])
    assert torch.equal(run.uncond_skip_level(sampler, schedule)(sigmas), sigmas)


def test_v_is_recovered_exactly_from_the_denoised_value(schedule: DiscreteSchedule) -> None:
    x_vp = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 3.2])
    denoiser = Denoiser(lambda x, t: v, schedule, "v")
    x_ve = x_vp * ((sigma**2 + 1) ** 0.5)[:, None, None, None]
    assert torch.allclose(v_from_denoised(x_vp, denoiser(x_ve, sigma), sigma), v, atol=1e-5)


def test_v_to_eps_uses_the_truncated_timestep(schedule: DiscreteSchedule) -> None:
    x_vp, v = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -1.25)
    ac = schedule.alphas_cumprod
    eps = eps_from_v_truncated(x_vp, v, torch.tensor([499.9]), ac)
    expected = ac[499].sqrt() * -1.25 + (1 - ac[499]).sqrt() * 0.5
    assert eps.item() == pytest.approx(expected.item(), abs=1e-7)
    assert eps.item() != pytest.approx(eps_from_v_truncated(x_vp, v, torch.tensor([500.0]), ac).item(), abs=1e-5)


def test_unipc_with_a_v_model_converts_like_a1111(schedule: DiscreteSchedule) -> None:
    """One first-order UniPC step from a fractional start time with a constant-v UNet: the result follows
    A1111's eps = sqrt(a[int t]) v + sqrt(1 - a[int t]) x_t, not the interpolated noise level."""
    v_value = 0.8
    denoiser = Denoiser(lambda x, t: torch.full_like(x, v_value), schedule, "v")
    x = torch.full((1, 1, 2, 2), 0.3)
    t_start = torch.tensor(0.5004)  # t_model = 499.3
    out = sample_unipc(denoiser, x, 1, schedule=schedule, t_start=t_start, order=1, prediction="v")

    ns = NoiseScheduleVP(schedule.alphas_cumprod)
    t0, t1 = t_start.reshape(1), torch.tensor([1.0 / ns.total_n])
    a_int = schedule.alphas_cumprod[int(ns.model_time(t0).item())]
    eps = a_int.sqrt() * v_value + (1 - a_int).sqrt() * 0.3
    x0 = (0.3 - ns.marginal_std(t0) * eps) / ns.marginal_alpha(t0)
    h = ns.marginal_lambda(t1) - ns.marginal_lambda(t0)
    expected = ns.marginal_std(t1) / ns.marginal_std(t0) * 0.3 - ns.marginal_alpha(t1) * torch.expm1(-h) * x0
    assert torch.allclose(out, expected.reshape(1, 1, 1, 1).expand_as(out), atol=1e-6)
    # The sigma-space (interpolated) conversion lands measurably elsewhere, so this pins the A1111 variant.
    eps_interp = sample_unipc(denoiser, x, 1, schedule=schedule, t_start=t_start, order=1, prediction="eps")
    assert not torch.allclose(out, eps_interp, atol=1e-4)


def test_run_sample_reads_the_prediction_off_the_denoiser(schedule: DiscreteSchedule) -> None:
    denoiser = Denoiser(lambda x, t: torch.full_like(x, 0.8), schedule, "v")
    plan = run.plan_txt2img("unipc", "automatic", 3, schedule)
    x = torch.full((1, 1, 2, 2), 0.3)
    implicit = run.sample(plan, denoiser, x)
    assert torch.equal(implicit, run.sample(plan, denoiser, x, prediction="v"))
    assert not torch.allclose(implicit, run.sample(plan, denoiser, x, prediction="eps"), atol=1e-4)
