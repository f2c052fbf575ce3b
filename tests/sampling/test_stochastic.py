"""Stochastic samplers through run.sample with per-image noise: the sample distribution, batch-of-N equals
N singles, and same seeds give the same tensors."""

import math

import pytest
import torch

from sdserver.sampling import run
from sdserver.sampling.noise import ImageRNG

S = 0.5
SHAPE = (4, 16, 32)
SEEDS = [11, 12, 13, 14]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchsde's float32 boundary notes, as in A1111


def run_txt2img(schedule, denoiser, sampler_id, steps, seeds=SEEDS, scheduler="automatic", shape=SHAPE, **kw):
    plan = run.plan_txt2img(sampler_id, scheduler, steps, schedule)
    rng = ImageRNG(shape, seeds)
    x = run.initial_latent(rng.next(), plan)
    return run.sample(plan, denoiser, x, rng=rng, **kw), plan


# Second-order or SDE samplers whose 30-step samples of N(0, s^2) data have std within a few % of s.
NEAR_EXACT = ["dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
              "dpm_fast", "dpm_adaptive", "restart"]


@pytest.mark.parametrize("sampler_id", NEAR_EXACT)
def test_stochastic_samples_have_the_data_std(schedule, gaussian, sampler_id):
    out, _ = run_txt2img(schedule, gaussian(S), sampler_id, 30)
    assert out.std().item() == pytest.approx(S, rel=0.04)
    assert abs(out.mean().item()) < 0.02


def test_euler_ancestral_matches_its_variance_recursion(schedule, gaussian):
    # Euler a is first order, so at 30 steps its samples are visibly too smooth; the exact variance of its
    # output for Gaussian data follows from the linear step x' = c x + sigma_up z.
    out, plan = run_txt2img(schedule, gaussian(S), "euler_a", 30)
    sig = plan.sigmas.double().tolist()
    v = sig[0] ** 2
    for a, b in zip(sig, sig[1:]):
        if b == 0:
            v *= (S * S / (S * S + a * a)) ** 2
            continue
        up = min(b, (b * b * (a * a - b * b) / (a * a)) ** 0.5)
        down = (b * b - up * up) ** 0.5
        v = v * (1 + (down - a) * a / (S * S + a * a)) ** 2 + up * up
    assert out.std().item() == pytest.approx(math.sqrt(v), rel=0.02)
    assert math.sqrt(v) < 0.9 * S  # the recursion really predicts a visible deficit


def test_ddim_eta_one_matches_its_variance_recursion(schedule, gaussian):
    out, plan = run_txt2img(schedule, gaussian(S), "ddim", 50, eta=1.0)
    ac = schedule.alphas_cumprod.double()
    ts = list(plan.timesteps)
    v = 1.0  # the VP start is unit noise
    for index in range(len(ts) - 1, 0, -1):
        a, a_prev = ac[ts[index]].item(), ac[ts[index - 1]].item()
        k1 = math.sqrt(a) * S * S / (a * S * S + 1 - a)  # E[x0 | x_t] = k1 x_t
        k2 = (1 - math.sqrt(a) * k1) / math.sqrt(1 - a)  # eps = k2 x_t
        sigma_t = math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        c = math.sqrt(a_prev) * k1 + math.sqrt(1 - a_prev - sigma_t**2) * k2
        v = v * c * c + sigma_t**2
    assert out.std().item() == pytest.approx(math.sqrt(v), rel=0.02)


def test_lcm_with_a_consistency_function_gives_the_data_std(schedule):
    # LCM re-noises the model's output, so it needs a consistency function (the PF-ODE map to sigma = 0),
    # which for Gaussian data is x s / sqrt(s^2 + sigma^2).
    def consistency(x, sigma, **extra):
        return x * S / (S * S + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5

    out, plan = run_txt2img(schedule, consistency, "lcm", 4)
    assert plan.sigmas[0].item() == pytest.approx(schedule.sigma_max, rel=1e-6)
    assert out.std().item() == pytest.approx(S, rel=0.04)


BATCH_CASES = [("euler_a", {}), ("dpm2_a", {}), ("dpmpp_2s_a", {}), ("dpmpp_sde", {}), ("dpmpp_2m_sde", {}),
               ("dpmpp_2m_sde_heun", {}), ("dpmpp_3m_sde", {}), ("dpm_fast", {}), ("restart", {}), ("lcm", {}),
               ("ddim", {"eta": 0.7}), ("ddim_cfgpp", {"eta": 0.7}), ("euler", {"s_churn": 2.0}),
               ("heun", {"s_churn": 2.0}), ("dpm2", {"s_churn": 2.0})]


@pytest.mark.parametrize("sampler_id, kw", BATCH_CASES)
def test_batch_of_n_equals_n_singles(schedule, gaussian, sampler_id, kw):
    steps = 21 if sampler_id == "restart" else 8  # Restart only re-noises from 20 steps on
    shape = (2, 4, 4)
    batch, _ = run_txt2img(schedule, gaussian(S), sampler_id, steps, seeds=[5, 6], shape=shape, **kw)
    singles = [run_txt2img(schedule, gaussian(S), sampler_id, steps, seeds=[s], shape=shape, **kw)[0] for s in (5, 6)]
    assert torch.allclose(batch, torch.cat(singles), rtol=1e-6, atol=1e-6)
    other, _ = run_txt2img(schedule, gaussian(S), sampler_id, steps, seeds=[5, 7], shape=shape, **kw)
    assert not torch.allclose(other[1], batch[1])  # the second image really depends on its own seed


@pytest.mark.parametrize("sampler_id", ["euler_a", "dpmpp_sde", "dpmpp_3m_sde", "ddim", "dpm_adaptive"])
def test_same_seed_twice_gives_identical_tensors(schedule, gaussian, sampler_id):
    a, _ = run_txt2img(schedule, gaussian(S), sampler_id, 6, shape=(2, 4, 4), eta=1.0)
    b, _ = run_txt2img(schedule, gaussian(S), sampler_id, 6, shape=(2, 4, 4), eta=1.0)
    assert torch.equal(a, b)


def test_ensd_changes_ancestral_noise_only_after_the_first_draw(schedule, gaussian):
    plan = run.plan_txt2img("euler_a", "automatic", 6, schedule)
    outs, firsts = [], []
    for ensd in (0, 31337):
        rng = ImageRNG((2, 4, 4), [3], ensd=ensd)
        first = rng.next()
        firsts.append(first)
        outs.append(run.sample(plan, gaussian(S), run.initial_latent(first, plan), rng=rng))
    assert torch.equal(firsts[0], firsts[1]) and not torch.allclose(outs[0], outs[1])
