"""Every sampler against the analytic Gaussian problem: data ~ N(0, s^2 I), ideal denoiser x s^2 / (s^2 + sigma^2).

The probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma = x sigma / (s^2 + sigma^2) has the exact solution
x(sigma) = x(sigma_T) * sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)): deterministic samplers must converge to it at
their order. Stochastic samplers started from N(0, s^2 + sigma_T^2) must end with std ~ s.
"""

import math

import pytest
import torch

from sdserver.sampling import dpm_solver, samplers_k, samplers_timestep, unipc

S = 0.5
SIGMA_HI, SIGMA_LO = 10.0, 0.1
X_T = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(1, 1, 8, 8) * SIGMA_HI


def exact(x_t, sigma_t, sigma_end):
    return x_t * math.sqrt((S * S + sigma_end**2) / (S * S + sigma_t**2))


def rel_error(out, want):
    return ((out.double() - want) .abs().max() / want.abs().max()).item()


def log_grid(n):
    """n steps evenly in log sigma from 10 to 0.1, not ending at 0 so the ODE error is what is measured."""
    return torch.exp(torch.linspace(math.log(SIGMA_HI), math.log(SIGMA_LO), n + 1, dtype=torch.float64))


# (sampler, fixed kwargs, (n_coarse, n_fine), minimal observed order)
ODE_CASES = {
    "euler": (samplers_k.sample_euler, {}, (16, 32), 0.9),
    "euler_a eta=0": (samplers_k.sample_euler_ancestral, {"eta": 0.0}, (16, 32), 0.9),
    "heun": (samplers_k.sample_heun, {}, (16, 32), 1.9),
    "restart (<20 steps)": (samplers_k.sample_restart, {}, (8, 16), 1.9),
    "dpm2": (samplers_k.sample_dpm_2, {}, (16, 32), 1.9),
    "dpm2_a eta=0": (samplers_k.sample_dpm_2_ancestral, {"eta": 0.0}, (16, 32), 1.9),
    "lms": (samplers_k.sample_lms, {}, (16, 32), 2.5),
    "dpmpp_2m": (samplers_k.sample_dpmpp_2m, {}, (32, 64), 1.8),
    "dpmpp_2s_a eta=0": (samplers_k.sample_dpmpp_2s_ancestral, {"eta": 0.0}, (16, 32), 1.8),
    "dpmpp_sde eta=0": (samplers_k.sample_dpmpp_sde, {"eta": 0.0}, (16, 32), 1.8),
    "dpmpp_2m_sde eta=0": (samplers_k.sample_dpmpp_2m_sde, {"eta": 0.0}, (32, 64), 1.8),
    "dpmpp_2m_sde heun eta=0": (samplers_k.sample_dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}, (32, 64), 1.5),
    "dpmpp_3m_sde eta=0": (samplers_k.sample_dpmpp_3m_sde, {"eta": 0.0}, (16, 32), 1.8),
}


@pytest.mark.parametrize("name", list(ODE_CASES))
def test_ode_samplers_converge_at_their_order(gaussian, name):
    fn, kwargs, (n1, n2), order = ODE_CASES[name]
    want = exact(X_T, SIGMA_HI, SIGMA_LO)
    e1 = rel_error(fn(gaussian(S), X_T.clone(), log_grid(n1), **kwargs), want)
    e2 = rel_error(fn(gaussian(S), X_T.clone(), log_grid(n2), **kwargs), want)
    assert e2 < 0.05
    assert math.log2(e1 / e2) >= order, (e1, e2)


def test_dpm_fast_converges(gaussian):
    want = exact(X_T, SIGMA_HI, SIGMA_LO)
    errors = [rel_error(dpm_solver.sample_dpm_fast(gaussian(S), X_T.clone(), SIGMA_LO, SIGMA_HI, n), want)
              for n in (12, 48)]
    assert errors[1] < 2e-3 and errors[0] / errors[1] > 4


def test_dpm_adaptive_meets_its_tolerance(gaussian):
    want = exact(X_T, SIGMA_HI, SIGMA_LO)
    loose = rel_error(dpm_solver.sample_dpm_adaptive(gaussian(S), X_T.clone(), SIGMA_LO, SIGMA_HI), want)
    tight = rel_error(dpm_solver.sample_dpm_adaptive(gaussian(S), X_T.clone(), SIGMA_LO, SIGMA_HI,
                                                     rtol=1e-4, atol=1e-5), want)
    assert loose < 0.1 and tight < loose / 10


@pytest.mark.parametrize("fn", [samplers_k.sample_heun, samplers_k.sample_dpmpp_2m,
                                samplers_k.sample_lms, samplers_k.sample_dpm_2])
def test_full_schedule_to_zero_lands_on_the_exact_sample(gaussian, fn):
    # Karras-style schedule ending in 0: the answer is x_T * s / sqrt(s^2 + sigma_T^2)
    ramp = torch.linspace(0, 1, 60, dtype=torch.float64)
    karras = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    sigmas = torch.cat([karras, torch.zeros(1, dtype=torch.float64)])
    out = fn(gaussian(S), X_T.clone(), sigmas)
    assert rel_error(out, exact(X_T, 14.6, 0.0)) < 5e-3


def _vp_exact(schedule, x_vp, t_from, t_to):
    sig = schedule.sigmas.double()
    x_ve = x_vp.double() * math.sqrt(1 + sig[t_from].item() ** 2)
    return exact(x_ve, sig[t_from].item(), sig[t_to].item()) / math.sqrt(1 + sig[t_to].item() ** 2)


@pytest.mark.parametrize("fn, ks, order", [(samplers_timestep.sample_ddim, (18, 90), 0.9),
                                           (samplers_timestep.sample_plms, (18, 90), 1.3)])
def test_timestep_samplers_converge(gaussian, schedule, fn, ks, order):
    x_vp = (X_T / math.sqrt(1 + schedule.sigmas[901].item() ** 2)).float()
    want = _vp_exact(schedule, x_vp, 901, 1)
    errors = []
    for k in ks:
        timesteps = [1 + 900 * j // k for j in range(k + 1)]
        errors.append(rel_error(fn(gaussian(S), x_vp.clone(), timesteps, schedule=schedule), want))
    assert errors[1] < 0.03
    assert math.log(errors[0] / errors[1]) / math.log(ks[1] / ks[0]) >= order, errors


def test_unipc_converges(gaussian, schedule):
    x_vp = (X_T / math.sqrt(1 + schedule.sigmas[999].item() ** 2)).float()
    want = _vp_exact(schedule, x_vp, 999, 0)
    log_snr = [rel_error(unipc.sample_unipc(gaussian(S), x_vp.clone(), n, schedule=schedule, skip_type="logSNR"), want)
               for n in (5, 10, 20)]
    assert log_snr[0] / log_snr[1] > 4 and log_snr[2] < 1e-4  # order 3 until float32 rounding
    uniform = [rel_error(unipc.sample_unipc(gaussian(S), x_vp.clone(), n, schedule=schedule, variant=variant), want)
               for n in (10, 40) for variant in ("bh1", "bh2")]
    assert uniform[2] < uniform[0] / 2 and uniform[3] < uniform[1] / 2 and max(uniform[2:]) < 0.03


def _nonlinear_eps_model():
    """A made-up eps UNet, nonlinear in x_t and t, to check the sigma-space route against eps space."""
    w = torch.tensor([[0.9, 0.1, 0.0, -0.2], [0.0, 0.8, 0.3, 0.0], [0.1, 0.0, 0.7, 0.2], [-0.1, 0.2, 0.0, 0.6]])

    def model_fn(x_t, t, **extra):
        t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x_t, w)) * (1 - t / 2000) + 0.05 * torch.sin(t / 100)

    return model_fn


def test_ddim_over_the_sigma_denoiser_equals_eps_space_ddim(schedule):
    from sdserver.sampling.discrete import Denoiser

    model_fn = _nonlinear_eps_model()
    timesteps = list(range(1, 1000, 100))
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    got = samplers_timestep.sample_ddim(Denoiser(model_fn, schedule), x.clone(), timesteps, schedule=schedule)

    # DDIM (eta = 0) written directly on the eps model, A1111's loop: from the last timestep down to the
    # second, landing on the first
    ac = schedule.alphas_cumprod.double()
    want = x.double()
    for index in range(len(timesteps) - 1, 0, -1):
        t, t_prev = timesteps[index], timesteps[index - 1]
        eps = model_fn(want.float(), torch.full((2,), float(t))).double()
        pred_x0 = (want - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        want = ac[t_prev].sqrt() * pred_x0 + (1 - ac[t_prev]).sqrt() * eps
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5)


def test_unipc_model_calls_see_the_eps_of_fractional_timesteps(schedule):
    from sdserver.sampling.discrete import Denoiser

    model_fn = _nonlinear_eps_model()
    ns = unipc.NoiseScheduleVP(schedule.alphas_cumprod)
    solver = unipc._UniPC(Denoiser(model_fn, schedule), schedule, ns, {}, "bh1")
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.4567, 0.4567])
    direct = model_fn(x, ns.model_time(t))
    assert torch.allclose(solver.eps(x, t), direct, atol=2e-5)


def test_unipc_vary_coeff_variant_runs_and_converges_on_the_default_grid(gaussian, schedule):
    x_vp = (X_T / math.sqrt(1 + schedule.sigmas[999].item() ** 2)).float()
    want = _vp_exact(schedule, x_vp, 999, 0)
    errors = [rel_error(unipc.sample_unipc(gaussian(S), x_vp.clone(), n, schedule=schedule, variant="vary_coeff"), want)
              for n in (10, 40)]
    assert errors[1] < errors[0] / 1.5 and errors[1] < 0.05
    with pytest.raises(ValueError):
        unipc.sample_unipc(gaussian(S), x_vp.clone(), 10, schedule=schedule, variant="bh3")
