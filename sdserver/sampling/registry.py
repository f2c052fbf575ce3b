"""The sampler and scheduler tables, keyed by internal id, in A1111 1.10's `/samplers` / `/schedulers` order.

Facts from A1111 1.10: `sd_samplers_kdiffusion.samplers_k_diffusion` (options, default schedulers),
`sampler_extra_params` (which of s_churn / s_tmin / s_tmax / s_noise each function receives),
`sd_samplers_timesteps`, `sd_samplers_lcm` and `sd_schedulers.schedulers`. A1111's labels and aliases
live in `sdserver.api.a1111`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

from sdserver.errors import UnknownSampler, UnknownScheduler
from sdserver.sampling import dpm_solver, samplers_k, samplers_timestep, schedules, unipc

Kind = Literal["k", "timestep"]
# How run.sample calls the function: over a sigma grid, over a sigma range and a step count (DPM fast /
# adaptive), over integer DDPM timesteps (DDIM, PLMS), or over continuous time (UniPC).
CallStyle = Literal["sigmas", "sigma_range", "timesteps", "continuous_time"]
ChurnParam = Literal["s_churn", "s_tmin", "s_tmax", "s_noise"]

_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_NOISE = ("s_noise",)


@dataclass(frozen=True)
class SamplerSpec:
    id: str
    function: Callable[..., Any]
    kind: Kind = "k"
    call: CallStyle = "sigmas"
    default_scheduler: str | None = None  # None: the model default (same as "uniform")
    second_order: bool = False  # two model calls per step
    discard_next_to_last_sigma: bool = False
    brownian_noise: bool = False  # SDE noise from per-seed Brownian trees instead of the image RNG
    uses_ensd: bool = False  # A1111 writes ENSD to the infotext only for these
    eta_option: Literal["ancestral", "ddim"] | None = None  # which eta option applies; None: no eta
    extra_params: tuple[ChurnParam, ...] = ()
    fixed_kwargs: tuple[tuple[str, Any], ...] = ()
    denoiser: Literal["standard", "lcm"] = "standard"

    @property
    def uses_eta(self) -> bool:
        return self.eta_option is not None

    @property
    def eta_default(self) -> float:
        """A1111 writes `Eta` to the infotext when eta differs from this."""
        return 0.0 if self.eta_option == "ddim" else 1.0


@dataclass(frozen=True)
class SchedulerSpec:
    id: str
    function: Callable[[int, schedules.ScheduleInputs], Any] | None  # None: automatic
    default_rho: float = -1.0  # -1: takes no rho
    need_inner_model: bool = False


_SAMPLERS = (
    SamplerSpec("dpmpp_2m", samplers_k.sample_dpmpp_2m, default_scheduler="karras"),
    SamplerSpec("dpmpp_sde", samplers_k.sample_dpmpp_sde, default_scheduler="karras", second_order=True,
                brownian_noise=True, eta_option="ancestral", extra_params=_NOISE),
    SamplerSpec("dpmpp_2m_sde", samplers_k.sample_dpmpp_2m_sde, default_scheduler="exponential",
                brownian_noise=True, eta_option="ancestral", extra_params=_NOISE),
    SamplerSpec("dpmpp_2m_sde_heun", samplers_k.sample_dpmpp_2m_sde, default_scheduler="exponential",
                brownian_noise=True, eta_option="ancestral", extra_params=_NOISE,
                fixed_kwargs=(("solver_type", "heun"),)),
    SamplerSpec("dpmpp_2s_a", samplers_k.sample_dpmpp_2s_ancestral, default_scheduler="karras", second_order=True,
                uses_ensd=True, eta_option="ancestral", extra_params=_NOISE),
    SamplerSpec("dpmpp_3m_sde", samplers_k.sample_dpmpp_3m_sde, default_scheduler="exponential",
                discard_next_to_last_sigma=True, brownian_noise=True, eta_option="ancestral", extra_params=_NOISE),
    SamplerSpec("euler_a", samplers_k.sample_euler_ancestral, uses_ensd=True, eta_option="ancestral"),
    SamplerSpec("euler", samplers_k.sample_euler, extra_params=_CHURN),
    SamplerSpec("lms", samplers_k.sample_lms),
    SamplerSpec("heun", samplers_k.sample_heun, second_order=True, extra_params=_CHURN),
    SamplerSpec("dpm2", samplers_k.sample_dpm_2, default_scheduler="karras", second_order=True,
                discard_next_to_last_sigma=True, extra_params=_CHURN),
    SamplerSpec("dpm2_a", samplers_k.sample_dpm_2_ancestral, default_scheduler="karras", second_order=True,
                discard_next_to_last_sigma=True, uses_ensd=True, eta_option="ancestral", extra_params=_NOISE),
    SamplerSpec("dpm_fast", dpm_solver.sample_dpm_fast, call="sigma_range", uses_ensd=True,
                eta_option="ancestral", extra_params=_NOISE),
    SamplerSpec("dpm_adaptive", dpm_solver.sample_dpm_adaptive, call="sigma_range", uses_ensd=True,
                eta_option="ancestral"),
    SamplerSpec("restart", samplers_k.sample_restart, default_scheduler="karras", second_order=True),
    SamplerSpec("ddim", samplers_timestep.sample_ddim, kind="timestep", call="timesteps", eta_option="ddim"),
    SamplerSpec("ddim_cfgpp", samplers_timestep.sample_ddim_cfgpp, kind="timestep", call="timesteps",
                eta_option="ddim"),
    SamplerSpec("plms", samplers_timestep.sample_plms, kind="timestep", call="timesteps"),
    SamplerSpec("unipc", unipc.sample_unipc, kind="timestep", call="continuous_time"),
    SamplerSpec("lcm", samplers_k.sample_lcm, denoiser="lcm"),
)

_SCHEDULERS = (
    SchedulerSpec("automatic", None),
    SchedulerSpec("uniform", schedules.uniform, need_inner_model=True),
    SchedulerSpec("karras", schedules.karras, default_rho=7.0),
    SchedulerSpec("exponential", schedules.exponential),
    SchedulerSpec("polyexponential", schedules.polyexponential, default_rho=1.0),
    SchedulerSpec("sgm_uniform", schedules.sgm_uniform, need_inner_model=True),
    SchedulerSpec("kl_optimal", schedules.kl_optimal),
    SchedulerSpec("align_your_steps", schedules.align_your_steps),
    SchedulerSpec("simple", schedules.simple, need_inner_model=True),
    SchedulerSpec("normal", schedules.normal, need_inner_model=True),
    SchedulerSpec("ddim", schedules.ddim, need_inner_model=True),
    SchedulerSpec("beta", schedules.beta, need_inner_model=True),
)

SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({s.id: s for s in _SAMPLERS})
SCHEDULERS: Mapping[str, SchedulerSpec] = MappingProxyType({s.id: s for s in _SCHEDULERS})


def get_sampler(sampler_id: str) -> SamplerSpec:
    try:
        return SAMPLERS[sampler_id]
    except KeyError:
        raise UnknownSampler(
            f"unknown sampler {sampler_id!r}; valid: {', '.join(SAMPLERS)}", field="sampler_name"
        ) from None


def get_scheduler(scheduler_id: str) -> SchedulerSpec:
    try:
        return SCHEDULERS[scheduler_id]
    except KeyError:
        raise UnknownScheduler(
            f"unknown scheduler {scheduler_id!r}; valid: {', '.join(SCHEDULERS)}", field="scheduler"
        ) from None
