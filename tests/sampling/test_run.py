"""The entry point: plans follow A1111 1.10's step and sigma semantics; sample wires options and noise."""

import pytest
import torch

from sdserver.errors import UnknownSampler, UnknownScheduler
from sdserver.sampling import run, schedules
from sdserver.sampling.discrete import Denoiser, LCMDenoiser
from sdserver.sampling.noise import ImageRNG, randn

S = 0.5
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchsde's float32 boundary notes, as in A1111


def model_range(schedule, **kw):
    return schedules.ScheduleInputs(sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max, schedule=schedule, **kw)


def test_automatic_resolves_to_the_sampler_default(schedule):
    assert run.resolve_scheduler("dpmpp_2m", "automatic") == "karras"
    assert run.resolve_scheduler("dpmpp_2m_sde", "automatic") == "exponential"
    assert run.resolve_scheduler("euler", "automatic") == "uniform"
    assert run.resolve_scheduler("euler", "beta") == "beta"
    karras = schedules.karras(12, model_range(schedule))
    assert torch.equal(run.plan_sigmas("dpmpp_2m", "automatic", 12, schedule), karras)
    assert torch.equal(run.plan_sigmas("euler", "automatic", 12, schedule), schedule.get_sigmas(12))


def test_dpm2_discards_the_penultimate_sigma(schedule):
    sigmas = run.plan_sigmas("dpm2", "automatic", 10, schedule)
    full = schedules.karras(11, model_range(schedule))
    assert len(sigmas) == 11 and torch.equal(sigmas, torch.cat([full[:-2], full[-1:]]))
    forced = run.plan_txt2img("euler", "karras", 10, schedule, always_discard_next_to_last_sigma=True)
    assert forced.discarded_penultimate and torch.equal(forced.sigmas, sigmas)


def test_schedule_overrides(schedule):
    got = run.plan_sigmas("euler", "karras", 5, schedule, sigma_min=0.1, sigma_max=10.0, rho=3.0)
    want = schedules.karras(5, schedules.ScheduleInputs(0.1, 10.0, schedule, rho=3.0))
    assert torch.equal(got, want)
    # rho only reaches schedulers that take one; a value equal to the default is no override
    assert torch.equal(run.plan_sigmas("euler", "exponential", 5, schedule, rho=3.0),
                       run.plan_sigmas("euler", "exponential", 5, schedule))
    assert torch.equal(run.plan_sigmas("euler", "karras", 5, schedule, rho=7.0),
                       run.plan_sigmas("euler", "karras", 5, schedule))


def test_align_your_steps_family(schedule):
    assert run.plan_sigmas("euler", "align_your_steps", 10, schedule, family="sdxl")[1].item() == pytest.approx(
        float(schedules.align_your_steps(10, schedules.ScheduleInputs(0, 0, schedule, family="sdxl"))[1]))


def test_img2img_step_semantics(schedule):
    full = run.plan_sigmas("euler", "automatic", 20, schedule)
    plan = run.plan_img2img("euler", "automatic", 20, 0.5, schedule)
    assert plan.steps == 11 and torch.equal(plan.sigmas, full[9:])  # t_enc = 10, t_enc + 1 steps from index 9
    fixed = run.plan_img2img("euler", "automatic", 20, 0.5, schedule, fix_steps=True)
    assert fixed.steps == 20 and len(fixed.sigmas) == 21  # int(20 / 0.5) = 40 built, exactly 20 run
    assert torch.equal(fixed.sigmas, run.plan_sigmas("euler", "automatic", 40, schedule)[20:])
    assert run.img2img_steps(20, 1.0) == (20, 19)  # denoise is capped at 0.999


def test_img2img_noised_latent_and_brownian_range(schedule):
    plan = run.plan_img2img("dpmpp_2m_sde", "automatic", 20, 0.4, schedule)
    full = run.plan_sigmas("dpmpp_2m_sde", "automatic", 20, schedule)
    assert plan.noise_range[1] == full.max() and plan.noise_range[0] == full[full > 0].min()
    init, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    assert torch.equal(run.noised_latent(init, noise, plan), init + noise * plan.sigmas[0])


def test_dpm_fast_uses_the_model_range_in_txt2img(schedule):
    plan = run.plan_txt2img("dpm_fast", "karras", 15, schedule, sigma_max=5.0)
    assert plan.solver_range == (schedule.sigma_min, schedule.sigma_max, 15)
    assert plan.start_sigma.item() == pytest.approx(5.0)  # but the start noise follows the schedule, as A1111
    img = run.plan_img2img("dpm_fast", "karras", 15, 0.5, schedule)
    assert img.solver_range == (img.sigmas[-2].item(), img.sigmas[0].item(), len(img.sigmas) - 1)


def test_initial_latent(schedule):
    noise = randn(1, (1, 4, 2, 2))
    plan = run.plan_txt2img("euler", "automatic", 10, schedule)
    assert torch.equal(run.initial_latent(noise, plan), noise * plan.sigmas[0])
    assert torch.allclose(run.initial_latent(noise, plan, sgm_noise_multiplier=True),
                          noise * (1 + plan.sigmas[0] ** 2) ** 0.5)
    assert torch.equal(run.initial_latent(noise, run.plan_txt2img("ddim", "automatic", 10, schedule)), noise)


def test_ddim_timesteps_and_model_calls(schedule, gaussian):
    plan = run.plan_txt2img("ddim", "automatic", 20, schedule)
    assert plan.timesteps == tuple(range(1, 1000, 50))
    denoiser = gaussian(S)
    run.sample(plan, denoiser, torch.randn(1, 4, 2, 2))
    assert denoiser.calls == 19  # A1111's DDIM runs steps - 1 model calls and stops at t = 1
    # 1000 // 30 = 33 gives 31 timesteps, so 30 calls
    plan30 = run.plan_txt2img("ddim", "automatic", 30, schedule)
    assert len(plan30.timesteps) == 31


def test_ddim_img2img_enters_one_timestep_below_its_noise(schedule):
    plan = run.plan_img2img("ddim", "automatic", 20, 0.5, schedule)
    ts = list(range(1, 1000, 50))
    assert plan.timesteps == tuple(ts[:10]) and plan.entry_timestep == ts[10]
    init, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    ac = schedule.alphas_cumprod[ts[10]]
    assert torch.allclose(run.noised_latent(init, noise, plan), init * ac.sqrt() + noise * (1 - ac).sqrt())


@pytest.mark.parametrize("sampler_id, calls", [("heun", 2 * 10 - 1), ("euler", 10), ("plms", 19 + 1), ("unipc", 20),
                                               ("dpmpp_sde", 2 * 10 - 1), ("dpm2", 2 * 10 - 1)])
def test_model_calls(schedule, gaussian, sampler_id, calls):
    steps = 20 if run.get_sampler(sampler_id).kind == "timestep" else 10
    plan = run.plan_txt2img(sampler_id, "automatic", steps, schedule)
    rng = ImageRNG((4, 2, 2), [1])
    denoiser = gaussian(S)
    run.sample(plan, denoiser, run.initial_latent(rng.next(), plan), rng=rng)
    assert denoiser.calls == calls


@pytest.mark.parametrize("sampler_id", ["euler", "dpmpp_2m", "lms", "ddim", "plms", "unipc", "dpm_fast", "lcm"])
def test_callback_once_per_step_and_interrupt(schedule, gaussian, sampler_id):
    plan = run.plan_txt2img(sampler_id, "automatic", 9, schedule)
    seen = []
    rng = ImageRNG((4, 2, 2), [1])
    x = run.initial_latent(rng.next(), plan)
    run.sample(plan, gaussian(S), x, rng=rng, callback=seen.append)
    # 9 DDIM steps: range(0, 1000, 111) is 10 timesteps, so 9 calls; UniPC runs len(timesteps) = 10 steps;
    # DPM fast splits 9 evaluations into orders 3, 3, 2, 1
    expected = {"unipc": 10, "dpm_fast": 4}.get(sampler_id, 9)
    assert [d["i"] for d in seen] == list(range(expected))
    assert {"i", "x", "sigma", "denoised"} <= set(seen[0])

    class Stop(Exception):
        pass

    def stop_at_3(d):
        if d["i"] == 3:
            raise Stop

    with pytest.raises(Stop):
        run.sample(plan, gaussian(S), x, rng=ImageRNG((4, 2, 2), [1]), callback=stop_at_3)


def test_eta_and_churn_options(schedule, gaussian):
    plan = run.plan_txt2img("euler_a", "automatic", 8, schedule)
    euler = run.plan_txt2img("euler", "automatic", 8, schedule)
    x = run.initial_latent(randn(1, (1, 4, 2, 2)), plan)
    deterministic = run.sample(plan, gaussian(S), x, rng=ImageRNG((4, 2, 2), [1]), eta=0.0)
    assert torch.allclose(deterministic, run.sample(euler, gaussian(S), x))
    default = run.sample(plan, gaussian(S), x, rng=ImageRNG((4, 2, 2), [1]))
    via_option = run.sample(plan, gaussian(S), x, rng=ImageRNG((4, 2, 2), [1]), eta_ancestral=1.0)
    assert torch.equal(default, via_option) and not torch.allclose(default, deterministic)
    # s_tmax = 0 means no upper bound; a tiny s_tmax switches the churn off again
    plain = run.sample(euler, gaussian(S), x, rng=ImageRNG((4, 2, 2), [1]))
    churned = run.sample(euler, gaussian(S), x, rng=ImageRNG((4, 2, 2), [1]), s_churn=1.0)
    bounded = run.sample(euler, gaussian(S), x, rng=ImageRNG((4, 2, 2), [1]), s_churn=1.0, s_tmax=1e-3)
    assert not torch.allclose(plain, churned) and torch.allclose(plain, bounded)


def test_ddim_cfgpp_uses_the_uncond_branch(schedule, gaussian):
    plan = run.plan_txt2img("ddim_cfgpp", "automatic", 10, schedule)
    ddim = run.plan_txt2img("ddim", "automatic", 10, schedule)
    x = randn(1, (1, 4, 2, 2))
    extra = {"cond_scale": 12.5}  # 12.5 / 12.5: the guided branch is the plain cond prediction
    same = run.sample(plan, gaussian(S, s_uncond=S), x, extra_args=extra)
    assert torch.allclose(same, run.sample(ddim, gaussian(S), x), atol=1e-6)
    other = run.sample(plan, gaussian(S, s_uncond=2.0), x, extra_args=extra)
    assert not torch.allclose(other, same, atol=1e-3)


def test_lcm_gets_its_own_denoiser_and_schedule(schedule):
    assert isinstance(run.make_denoiser("lcm", lambda x, t: x, schedule), LCMDenoiser)
    den = run.make_denoiser("euler", lambda x, t: x, schedule, "v")
    assert isinstance(den, Denoiser) and den.prediction == "v"
    plan = run.plan_txt2img("lcm", "automatic", 4, schedule)
    assert plan.sigmas[-2].item() == pytest.approx(schedule.sigmas[19].item(), rel=1e-6)
    assert len(plan.schedule.sigmas) == 50


def test_kl_optimal_run_ends_at_sigma_min(schedule, gaussian):
    plan = run.plan_txt2img("euler", "kl_optimal", 10, schedule)
    assert len(plan.sigmas) == 11 and plan.sigmas[-1].item() == pytest.approx(schedule.sigma_min, rel=1e-5)


def test_unknown_names_are_typed_errors(schedule):
    with pytest.raises(UnknownSampler) as e:
        run.plan_txt2img("k_euler", "automatic", 10, schedule)
    assert e.value.field == "sampler_name" and "euler_a" in e.value.message
    with pytest.raises(UnknownScheduler) as e:
        run.plan_txt2img("euler", "Karras", 10, schedule)
    assert e.value.field == "scheduler"


def test_brownian_samplers_need_seeds(schedule, gaussian):
    plan = run.plan_txt2img("dpmpp_sde", "automatic", 4, schedule)
    with pytest.raises(ValueError):
        run.sample(plan, gaussian(S), torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("sampler_id", ["ddim", "unipc"])
def test_img2img_with_no_timestep_left_returns_the_input(schedule, gaussian, sampler_id):
    plan = run.plan_img2img(sampler_id, "automatic", 10, 0.05, schedule)  # t_enc = int(0.5) = 0
    x = torch.ones(1, 4, 2, 2)
    assert plan.timesteps == () and torch.equal(run.sample(plan, gaussian(S), x), x)


def test_bad_user_values_are_typed_errors(schedule):
    from sdserver.errors import InvalidRequest

    for call, field in [(lambda: run.plan_txt2img("euler", "automatic", 0, schedule), "steps"),
                        (lambda: run.plan_txt2img("ddim", "automatic", 1001, schedule), "steps"),
                        (lambda: run.plan_img2img("euler", "automatic", 10, 0.0, schedule, fix_steps=True),
                         "denoising_strength"),
                        (lambda: run.UniPCOptions(variant="bh3"), "uni_pc_variant"),
                        (lambda: ImageRNG((4, 2, 2), [1], source="quantum"), "randn_source")]:
        with pytest.raises(InvalidRequest) as e:
            call()
        assert e.value.field == field
