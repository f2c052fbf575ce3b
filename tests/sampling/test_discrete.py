import math

import pytest
import torch

from sdserver.sampling.discrete import Denoiser, DiscreteSchedule, LCMDenoiser


def test_sigmas_follow_alphas_cumprod(schedule):
    ac = schedule.alphas_cumprod.double()
    expected = ((1 - ac) / ac).sqrt()
    assert torch.allclose(schedule.sigmas.double(), expected, rtol=1e-6)
    # SD's well-known range: about 0.0292 to 14.6146
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_sigma_to_t_hits_integer_timesteps_exactly(schedule):
    ts = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas[ts]), ts.float())


def test_t_to_sigma_interpolates_log_sigma(schedule):
    t = torch.tensor([10.25])
    lo, hi = schedule.sigmas[10].log(), schedule.sigmas[11].log()
    assert schedule.t_to_sigma(t).item() == pytest.approx(math.exp(0.75 * lo + 0.25 * hi), rel=1e-6)
    assert schedule.sigma_to_t(schedule.t_to_sigma(t)).item() == pytest.approx(10.25, abs=1e-3)


def _ideal_eps_model(schedule, s2):
    """A UNet that predicts eps exactly for N(0, s2) data (works on the scaled latent)."""

    def model_fn(x_t, t):
        sigma = schedule.t_to_sigma(t).reshape(-1, 1, 1, 1)
        x = x_t * (sigma**2 + 1) ** 0.5
        return (x - x * s2 / (s2 + sigma**2)) / sigma

    return model_fn


def _ideal_v_model(schedule, s2):
    def model_fn(x_t, t):
        sigma = schedule.t_to_sigma(t).reshape(-1, 1, 1, 1)
        alpha, sig_vp = 1 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5
        x = x_t / alpha
        x0 = x * s2 / (s2 + sigma**2)
        eps = (x - x0) / sigma
        return alpha * eps - sig_vp * x0  # v = alpha eps - sigma_vp x0

    return model_fn


@pytest.mark.parametrize("prediction, make", [("eps", _ideal_eps_model), ("v", _ideal_v_model)])
def test_denoiser_recovers_the_ideal_denoised_value(schedule, prediction, make):
    s2 = 0.7
    denoiser = Denoiser(make(schedule, s2), schedule, prediction)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 5
    sigma = schedule.sigmas[torch.tensor([10, 400, 999])]
    expected = x * s2 / (s2 + sigma.reshape(-1, 1, 1, 1) ** 2)
    assert torch.allclose(denoiser(x, sigma), expected, atol=1e-4, rtol=1e-4)
    eps = denoiser.get_eps(x, sigma)
    assert torch.allclose(eps, (x - expected) / sigma.reshape(-1, 1, 1, 1), atol=1e-4, rtol=1e-4)


def test_denoiser_passes_scaled_latent_and_timestep(schedule):
    seen = {}

    def model_fn(x_t, t, **extra):
        seen.update(x_t=x_t, t=t, extra=extra)
        return torch.zeros_like(x_t)

    x = torch.ones(1, 1, 2, 2)
    sigma = schedule.sigmas[500:501]
    out = Denoiser(model_fn, schedule)(x, sigma, cond="c")
    assert torch.allclose(seen["x_t"], x / (1 + sigma**2) ** 0.5)
    assert seen["t"].tolist() == [500.0]
    assert seen["extra"] == {"cond": "c"}
    assert torch.equal(out, x)  # zero eps: nothing removed


def test_denoiser_rejects_unknown_prediction(schedule):
    with pytest.raises(ValueError):
        Denoiser(lambda x, t: x, schedule, "x0")


def test_lcm_schedule_uses_fifty_original_timesteps(schedule):
    lcm = schedule.lcm()
    assert len(lcm.sigmas) == 50
    assert lcm.sigmas[0] == schedule.sigmas[19] and lcm.sigmas[-1] == schedule.sigmas[999]
    # sigma -> nearest of the 50, reported as its DDPM timestep
    assert lcm.sigma_to_t(schedule.sigmas[torch.tensor([19, 40, 999])]).tolist() == [19, 39, 999]
    sigmas = lcm.get_sigmas(4)
    assert sigmas[-1] == 0 and len(sigmas) == 5
    assert sigmas[0].item() == pytest.approx(schedule.sigma_max, rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(schedule.sigmas[19].item(), rel=1e-6)


def test_lcm_denoiser_applies_the_consistency_boundary(schedule):
    lcm = schedule.lcm()
    eps = torch.full((1, 1, 1, 1), 0.5)
    denoiser = LCMDenoiser(lambda x_t, t: eps.expand_as(x_t), lcm)
    x = torch.full((1, 1, 1, 1), 2.0)
    sigma = lcm.sigmas[10:11]
    t = 10 * 20 + 19
    st = t * 10.0
    c_skip, c_out = 0.25 / (st**2 + 0.25), st / (st**2 + 0.25) ** 0.5
    expected = c_out * (2.0 - sigma.item() * 0.5) + c_skip * 2.0
    assert denoiser(x, sigma).item() == pytest.approx(expected, rel=1e-5)


def test_schedule_is_frozen(schedule):
    with pytest.raises(Exception):
        schedule.sigmas = torch.zeros(3)
    assert isinstance(schedule, DiscreteSchedule)
