"""The one entry point the pipeline uses: plan a run, build its starting latent, sample.

A plan is more than a sigma tensor because A1111's samplers differ in what they walk: k-diffusion samplers
walk a sigma grid; DPM fast / adaptive only take a sigma range and a step count (the model's range in
txt2img, whatever the scheduler); the timestep samplers walk DDPM timesteps and, in img2img, start one
timestep below the noise level of their input; SDE samplers size their Brownian trees from the full schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from sdserver.errors import InvalidRequest
from sdserver.sampling import schedules
from sdserver.sampling.discrete import DenoiserFn, Denoiser, DiscreteSchedule, LCMDenoiser, ModelFn, Prediction
from sdserver.sampling.noise import BrownianTreeNoiseSampler, ImageRNG, rng_noise_sampler
from sdserver.sampling.registry import SamplerSpec, get_sampler, get_scheduler
from sdserver.sampling.unipc import SKIP_TYPES, VARIANTS, NoiseScheduleVP, time_steps

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class UniPCOptions:
    """A1111's `uni_pc_*` options, with its defaults."""

    variant: str = "bh1"
    skip_type: str = "time_uniform"
    order: int = 3
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InvalidRequest(f"uni_pc_variant must be one of {VARIANTS}", field="uni_pc_variant")
        if self.skip_type not in SKIP_TYPES:
            raise InvalidRequest(f"uni_pc_skip_type must be one of {SKIP_TYPES}", field="uni_pc_skip_type")
        if self.order < 1:
            raise InvalidRequest("uni_pc_order must be at least 1", field="uni_pc_order")


@dataclass(frozen=True)
class SamplingPlan:
    sampler_id: str
    schedule: DiscreteSchedule  # what the denoiser must use (the LCM view for "lcm")
    sigmas: Tensor  # k samplers: the grid walked; timestep samplers: sigma of each timestep visited
    start_sigma: Tensor  # noise level the starting latent is scaled / noised to (0-d)
    steps: int  # A1111's step count for progress: steps (txt2img) or t_enc + 1 (img2img)
    noise_range: tuple[Tensor, Tensor]  # Brownian tree interval: the full schedule's smallest sigma > 0, largest
    solver_range: tuple[float, float, int] = (0.0, 0.0, 0)  # DPM fast / adaptive: sigma_min, sigma_max, n
    timesteps: tuple[int, ...] = ()  # timestep samplers: ascending DDPM timesteps
    entry_timestep: int | None = None  # timestep samplers, img2img: noise level of the input latent
    unipc_t_start: Tensor | None = None  # UniPC img2img: continuous start time
    is_img2img: bool = False
    scheduler_id: str = "automatic"  # the scheduler actually used (automatic resolved), for the infotext
    discarded_penultimate: bool = False

    @property
    def spec(self) -> SamplerSpec:
        return get_sampler(self.sampler_id)


def sampler_schedule(sampler_id: str, schedule: DiscreteSchedule) -> DiscreteSchedule:
    return schedule.lcm() if get_sampler(sampler_id).denoiser == "lcm" else schedule


def make_denoiser(sampler_id: str, model_fn: ModelFn, schedule: DiscreteSchedule,
                  prediction: Prediction = "eps") -> DenoiserFn:
    """The sigma-space denoiser A1111 wraps the UNet in for this sampler (LCM has its own)."""
    if get_sampler(sampler_id).denoiser == "lcm":
        return LCMDenoiser(model_fn, schedule.lcm())
    return Denoiser(model_fn, schedule, prediction)


def uncond_skip_level(sampler_id: str, schedule: DiscreteSchedule) -> Callable[[Tensor], Tensor]:
    """The quantity A1111 compares `s_min_uncond` against, from the sigma the denoiser is called with.

    A1111's CFG denoiser tests `sigma < s_min_uncond` on whatever its sampler passes as "sigma": the noise level
    for k-diffusion samplers, but the (possibly fractional) DDPM timestep for DDIM, PLMS and UniPC, so with
    the usual sigma-sized thresholds the negative prompt is never skipped there. sdserver calls every denoiser
    with sigma, so for the timestep samplers the sigma is mapped back to its timestep.
    """
    if get_sampler(sampler_id).kind == "timestep":
        return schedule.sigma_to_t
    return _identity


def _identity(sigma: Tensor) -> Tensor:
    return sigma


def resolve_scheduler(sampler_id: str, scheduler_id: str) -> str:
    """automatic -> the sampler's default, else uniform (the model default)."""
    get_scheduler(scheduler_id)
    if scheduler_id != "automatic":
        return scheduler_id
    return get_sampler(sampler_id).default_scheduler or "uniform"


def _k_sigmas(spec: SamplerSpec, scheduler_id: str, steps: int, schedule: DiscreteSchedule, *, sigma_min: float,
              sigma_max: float, rho: float, always_discard: bool, family: str, beta_alpha: float,
              beta_beta: float) -> tuple[Tensor, bool]:
    """A1111's KDiffusionSampler.get_sigmas."""
    discard = spec.discard_next_to_last_sigma or always_discard
    n = steps + 1 if discard else steps
    sched = get_scheduler(resolve_scheduler(spec.id, scheduler_id))
    m_min, m_max = schedule.sigma_min, schedule.sigma_max
    inputs = schedules.ScheduleInputs(
        sigma_min=sigma_min if sigma_min != 0 and sigma_min != m_min else m_min,
        sigma_max=sigma_max if sigma_max != 0 and sigma_max != m_max else m_max,
        schedule=schedule,
        rho=rho if sched.default_rho != -1 and rho != 0 and rho != sched.default_rho else None,
        family=family,
        beta_alpha=beta_alpha,
        beta_beta=beta_beta,
    )
    sigmas = sched.function(n, inputs)
    if discard:
        sigmas = schedules.discard_next_to_last(sigmas)
    return sigmas.float().cpu(), discard


def _ddim_timesteps(steps: int, n_train: int) -> list[int]:
    """A1111's CompVisSampler.get_timesteps: range(0, 1000, 1000 // steps) + 1, clipped to 999."""
    if steps > n_train:
        raise InvalidRequest(f"timestep samplers run at most {n_train} steps, not {steps}", field="steps")
    return [min(max(t + 1, 0), n_train - 1) for t in range(0, n_train, n_train // steps)]


def _noise_range(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    return sigmas[sigmas > 0].min(), sigmas.max()


def _unipc_sigmas(schedule: DiscreteSchedule, steps: int, t_start: Tensor | None, options: UniPCOptions) -> Tensor:
    ns = NoiseScheduleVP(schedule.alphas_cumprod)
    t_T = ns.T if t_start is None else t_start
    ts = time_steps(ns, options.skip_type, t_T, 1.0 / ns.total_n, steps)
    return schedule.t_to_sigma(ns.model_time(ts).clamp(0, len(schedule.sigmas) - 1)).float()


def plan_txt2img(sampler_id: str, scheduler_id: str, steps: int, schedule: DiscreteSchedule, *, sigma_min: float = 0.0,
                 sigma_max: float = 0.0, rho: float = 0.0, always_discard_next_to_last_sigma: bool = False,
                 family: str = "sd1", beta_alpha: float = schedules.BETA_DEFAULT_ALPHA,
                 beta_beta: float = schedules.BETA_DEFAULT_BETA, unipc: UniPCOptions = UniPCOptions()) -> SamplingPlan:
    """Plan a txt2img (or hires second pass run as txt2img) sampling of `steps` steps.

    sigma_min / sigma_max / rho: A1111's schedule overrides, 0 = the model's / the scheduler's own.
    family: "sdxl" picks the SDXL Align Your Steps table.
    """
    if steps < 1:
        raise InvalidRequest("steps must be at least 1", field="steps")
    spec = get_sampler(sampler_id)
    sched_schedule = sampler_schedule(sampler_id, schedule)
    if spec.kind == "timestep":
        ts = _ddim_timesteps(steps + 1 if always_discard_next_to_last_sigma else steps, len(schedule.alphas_cumprod))
        if spec.call == "continuous_time":
            sigmas = _unipc_sigmas(schedule, len(ts), None, unipc)
        else:
            sigmas = schedule.sigmas[torch.tensor(ts)].flip(0)
        return SamplingPlan(sampler_id, schedule, sigmas, sigmas[0], steps, _noise_range(sigmas), timesteps=tuple(ts),
                            scheduler_id="automatic", discarded_penultimate=always_discard_next_to_last_sigma)
    sigmas, discarded = _k_sigmas(spec, scheduler_id, steps, sched_schedule, sigma_min=sigma_min, sigma_max=sigma_max,
                                  rho=rho, always_discard=always_discard_next_to_last_sigma, family=family,
                                  beta_alpha=beta_alpha, beta_beta=beta_beta)
    plan = SamplingPlan(sampler_id, sched_schedule, sigmas, sigmas[0], steps, _noise_range(sigmas),
                        solver_range=(sched_schedule.sigma_min, sched_schedule.sigma_max, steps),
                        scheduler_id=resolve_scheduler(sampler_id, scheduler_id), discarded_penultimate=discarded)
    return plan


def plan_sigmas(sampler_id: str, scheduler_id: str, steps: int, schedule: DiscreteSchedule, **kwargs: Any) -> Tensor:
    """The sigmas a txt2img run walks (see plan_txt2img for the keywords)."""
    return plan_txt2img(sampler_id, scheduler_id, steps, schedule, **kwargs).sigmas


def img2img_steps(steps: int, denoising_strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """A1111's setup_img2img_steps: (length of the schedule to build, t_enc). t_enc + 1 steps run.

    Default: a `steps` schedule, entered at step steps - t_enc - 1 with t_enc = int(min(d, 0.999) * steps).
    fix_steps (A1111's img2img_fix_steps, and every hires pass): a schedule of int(steps / d) and t_enc =
    steps - 1, so exactly `steps` steps run.
    """
    if fix_steps:
        total = int(steps / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
        return total, steps - 1
    return steps, int(min(denoising_strength, 0.999) * steps)


def plan_img2img(sampler_id: str, scheduler_id: str, steps: int, denoising_strength: float, schedule: DiscreteSchedule,
                 *, fix_steps: bool = False, unipc: UniPCOptions = UniPCOptions(), **kwargs: Any) -> SamplingPlan:
    """Plan an img2img run (A1111's sample_img2img); keywords as plan_txt2img."""
    total, t_enc = img2img_steps(steps, denoising_strength, fix_steps)
    if total < 1:
        raise InvalidRequest("denoising_strength leaves no steps to run", field="denoising_strength")
    spec = get_sampler(sampler_id)
    if spec.kind == "timestep":
        always_discard = bool(kwargs.get("always_discard_next_to_last_sigma", False))
        ts = _ddim_timesteps(total + 1 if always_discard else total, len(schedule.alphas_cumprod))
        sched_ts = ts[:t_enc]
        entry = ts[min(t_enc, len(ts) - 1)]
        t_start = None
        if spec.call == "continuous_time" and sched_ts:
            t_start = torch.tensor(sched_ts[-1]) / 1000 + 1 / 1000
            sigmas = _unipc_sigmas(schedule, len(sched_ts), t_start, unipc)
        else:
            sigmas = schedule.sigmas[torch.tensor(sched_ts, dtype=torch.long)].flip(0)
        full = schedule.sigmas[torch.tensor(ts)]
        return SamplingPlan(sampler_id, schedule, sigmas, schedule.sigmas[entry], t_enc + 1, _noise_range(full),
                            timesteps=tuple(sched_ts), entry_timestep=entry, unipc_t_start=t_start, is_img2img=True,
                            discarded_penultimate=always_discard)
    full_plan = plan_txt2img(sampler_id, scheduler_id, total, schedule, **kwargs)
    sched = full_plan.sigmas[total - t_enc - 1 :]
    return replace(full_plan, sigmas=sched, start_sigma=sched[0], steps=t_enc + 1, is_img2img=True,
                   solver_range=(sched[-2].item(), sched[0].item(), len(sched) - 1))


def initial_latent(noise: Tensor, plan: SamplingPlan, *, sgm_noise_multiplier: bool = False) -> Tensor:
    """txt2img's starting latent from the image RNG's first draw."""
    if plan.spec.kind == "timestep":
        return noise  # the timestep samplers start from unscaled noise (the VP latent at T)
    sigma0 = plan.start_sigma.to(noise.device)
    if sgm_noise_multiplier:
        return noise * torch.sqrt(1.0 + sigma0**2.0)
    return noise * sigma0


def noised_latent(init_latent: Tensor, noise: Tensor, plan: SamplingPlan) -> Tensor:
    """img2img's starting latent: the encoded image noised to the plan's entry level."""
    if plan.spec.kind == "timestep":
        ac = plan.schedule.alphas_cumprod[plan.entry_timestep].to(init_latent.device)
        return init_latent * torch.sqrt(ac) + noise * torch.sqrt(1 - ac)
    return init_latent + noise * plan.start_sigma.to(init_latent.device)


def _eta(spec: SamplerSpec, eta: float | None, eta_ancestral: float, eta_ddim: float) -> float:
    if eta is not None:
        return eta
    return eta_ddim if spec.eta_option == "ddim" else eta_ancestral


def sample(plan: SamplingPlan, denoiser: DenoiserFn, x: Tensor, *, rng: ImageRNG | None = None,
           seeds: list[int] | None = None, eta: float | None = None, eta_ancestral: float = 1.0,
           eta_ddim: float = 0.0, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = 0.0,
           s_noise: float = 1.0, callback: Callback | None = None, extra_args: dict[str, Any] | None = None,
           unipc: UniPCOptions = UniPCOptions(), prediction: Prediction | None = None) -> Tensor:
    """Run the planned sampler; returns the latent to decode.

    x: from `initial_latent` / `noised_latent`. rng: the batch's ImageRNG whose first draw made x (ancestral,
    churn and DDIM noise continue its generators). seeds: the Brownian tree seeds, default rng.seeds
    (A1111 uses the batch's image seeds). eta: the request's eta, None for the option default.
    s_tmax = 0 means infinity. callback(dict(i, x, sigma, sigma_hat, denoised)) runs once per step;
    exceptions it raises propagate (that is how the pipeline interrupts). prediction: the UNet's "eps" / "v"
    (only UniPC needs it); None reads the denoiser's `prediction` attribute, "eps" when it has none.
    """
    spec = plan.spec
    kwargs: dict[str, Any] = dict(spec.fixed_kwargs)
    kwargs.update(extra_args=extra_args or {}, callback=callback)
    if spec.uses_eta:
        kwargs["eta"] = _eta(spec, eta, eta_ancestral, eta_ddim)
    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax or float("inf"), "s_noise": s_noise}
    kwargs.update({name: churn[name] for name in spec.extra_params})
    if spec.brownian_noise:
        tree_seeds = seeds if seeds is not None else (rng.seeds if rng is not None else None)
        if tree_seeds is None:
            raise ValueError(f"{spec.id} needs seeds (or an rng) for its Brownian noise")
        lo, hi = plan.noise_range
        kwargs["noise_sampler"] = BrownianTreeNoiseSampler(x, lo, hi, tree_seeds)
    elif rng is not None:
        kwargs["noise_sampler"] = rng_noise_sampler(rng)

    if spec.call == "sigmas":
        return spec.function(denoiser, x, plan.sigmas.to(x.device), **kwargs)
    if spec.call == "sigma_range":
        sigma_min, sigma_max, n = plan.solver_range
        if spec.id == "dpm_fast":
            return spec.function(denoiser, x, sigma_min, sigma_max, n, **kwargs)
        return spec.function(denoiser, x, sigma_min, sigma_max, **kwargs)
    if not plan.timesteps:
        return x
    if spec.call == "timesteps":
        return spec.function(denoiser, x, plan.timesteps, schedule=plan.schedule, **kwargs)
    return spec.function(denoiser, x, len(plan.timesteps), schedule=plan.schedule, t_start=plan.unipc_t_start,
                         order=unipc.order, variant=unipc.variant, skip_type=unipc.skip_type,
                         lower_order_final=unipc.lower_order_final,
                         prediction=prediction or getattr(denoiser, "prediction", "eps"), **kwargs)
