"""A1111 1.10 sampler and scheduler names, mapped to sdserver's internal ids.

A1111 resolves names in `modules/sd_samplers.py: get_sampler_and_scheduler`: `sampler_name or sampler_index`,
a legacy scheduler suffix ("DPM++ 2M Karras") split off, the scheduler looked up by name or label, and an unknown
sampler silently replaced by DPM++ 2M. sdserver keeps the splitting, widens the matching (any case, aliases,
internal ids) and refuses unknown names with a 422 instead of substituting: a silent fallback changes the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdserver.errors import UnknownSampler, UnknownScheduler

AUTOMATIC = "automatic"
USE_SAME_SAMPLER = "Use same sampler"
USE_SAME_SCHEDULER = "Use same scheduler"
# A1111's API default: `sampler_index` defaults to "Euler" and is used when `sampler_name` is empty.
DEFAULT_SAMPLER_LABEL = "Euler"


@dataclass(frozen=True)
class SamplerName:
    id: str  # internal id (sdserver.sampling registry)
    label: str  # A1111's `name` in /samplers
    aliases: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = "kdiffusion"  # "kdiffusion" or "timesteps": which eta option applies (eta_ancestral / eta_ddim)
    uses_eta: bool = False  # the sampler function takes `eta` (infotext `Eta` / `Eta DDIM`)
    # s_* parameters A1111 passes to this sampler (`sampler_extra_params`); only those reach the infotext.
    sigma_params: tuple[str, ...] = ()

    @property
    def option_scheduler(self) -> str | None:
        """The scheduler A1111's "Automatic" means for this sampler, when it names one."""
        return self.options.get("scheduler")


@dataclass(frozen=True)
class SchedulerName:
    id: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False


_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")

# Order is A1111 1.10's /samplers order (k-diffusion, then timestep samplers, then LCM).
SAMPLERS: tuple[SamplerName, ...] = (
    SamplerName("dpmpp_2m", "DPM++ 2M", ("k_dpmpp_2m",), {"scheduler": "karras"}),
    SamplerName("dpmpp_sde", "DPM++ SDE", ("k_dpmpp_sde",),
                {"scheduler": "karras", "second_order": True, "brownian_noise": True},
                uses_eta=True, sigma_params=("s_noise",)),
    SamplerName("dpmpp_2m_sde", "DPM++ 2M SDE", ("k_dpmpp_2m_sde",),
                {"scheduler": "exponential", "brownian_noise": True}, uses_eta=True, sigma_params=("s_noise",)),
    SamplerName("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",),
                {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"},
                uses_eta=True, sigma_params=("s_noise",)),
    SamplerName("dpmpp_2s_a", "DPM++ 2S a", ("k_dpmpp_2s_a",),
                {"scheduler": "karras", "uses_ensd": True, "second_order": True},
                uses_eta=True, sigma_params=("s_noise",)),
    SamplerName("dpmpp_3m_sde", "DPM++ 3M SDE", ("k_dpmpp_3m_sde",),
                {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
                uses_eta=True, sigma_params=("s_noise",)),
    # A1111 1.10 passes no s_* to Euler a (Forge passes s_noise).
    SamplerName("euler_a", "Euler a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": True}, uses_eta=True),
    SamplerName("euler", "Euler", ("k_euler",), {}, sigma_params=_CHURN),
    SamplerName("lms", "LMS", ("k_lms",), {}),
    SamplerName("heun", "Heun", ("k_heun",), {"second_order": True}, sigma_params=_CHURN),
    SamplerName("dpm2", "DPM2", ("k_dpm_2",),
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True},
                sigma_params=_CHURN),
    SamplerName("dpm2_a", "DPM2 a", ("k_dpm_2_a",),
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True,
                 "second_order": True},
                uses_eta=True, sigma_params=("s_noise",)),
    SamplerName("dpm_fast", "DPM fast", ("k_dpm_fast",), {"uses_ensd": True}, uses_eta=True,
                sigma_params=("s_noise",)),
    SamplerName("dpm_adaptive", "DPM adaptive", ("k_dpm_ad",), {"uses_ensd": True}, uses_eta=True),
    SamplerName("restart", "Restart", ("restart",), {"scheduler": "karras", "second_order": True}),
    SamplerName("ddim", "DDIM", ("ddim",), {}, kind="timesteps", uses_eta=True),
    SamplerName("ddim_cfgpp", "DDIM CFG++", ("ddim_cfgpp",), {}, kind="timesteps", uses_eta=True),
    SamplerName("plms", "PLMS", ("plms",), {}, kind="timesteps"),
    SamplerName("unipc", "UniPC", ("unipc",), {}, kind="timesteps"),
    SamplerName("lcm", "LCM", ("k_lcm",), {}),
)

SCHEDULERS: tuple[SchedulerName, ...] = (
    SchedulerName("automatic", "Automatic"),
    SchedulerName("uniform", "Uniform", need_inner_model=True),
    SchedulerName("karras", "Karras", default_rho=7.0),
    SchedulerName("exponential", "Exponential"),
    SchedulerName("polyexponential", "Polyexponential", default_rho=1.0),
    SchedulerName("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    SchedulerName("kl_optimal", "KL Optimal"),
    SchedulerName("align_your_steps", "Align Your Steps"),
    SchedulerName("simple", "Simple", need_inner_model=True),
    SchedulerName("normal", "Normal", need_inner_model=True),
    SchedulerName("ddim", "DDIM", need_inner_model=True),
    SchedulerName("beta", "Beta", need_inner_model=True),
)

# Pre-1.6 A1111 listed bundled samplers under aliases like "k_dpmpp_2m_ka"; the suffix names the schedule.
_LEGACY_ALIAS_SUFFIXES = (("_ka", "karras"), ("_exp", "exponential"))


def _sampler_keys(s: SamplerName) -> tuple[str, ...]:
    return (s.label.lower(), s.id, *(a.lower() for a in s.aliases))


def _scheduler_keys(s: SchedulerName) -> tuple[str, ...]:
    return (s.label.lower(), s.id, *(a.lower() for a in s.aliases))


def find_sampler(name: str) -> SamplerName | None:
    """The sampler a label, alias or internal id names (any case), without suffix splitting; None if none."""
    return _find_sampler(name)


def _find_sampler(name: str) -> SamplerName | None:
    key = name.strip().lower()
    for s in SAMPLERS:
        if key in _sampler_keys(s):
            return s
    return None


def _find_scheduler(name: str) -> SchedulerName | None:
    key = name.strip().lower()
    for s in SCHEDULERS:
        if key in _scheduler_keys(s):
            return s
    return None


def sampler_by_id(sampler_id: str) -> SamplerName:
    for s in SAMPLERS:
        if s.id == sampler_id:
            return s
    raise KeyError(sampler_id)


def scheduler_by_id(scheduler_id: str) -> SchedulerName:
    for s in SCHEDULERS:
        if s.id == scheduler_id:
            return s
    raise KeyError(scheduler_id)


def sampler_label(sampler_id: str) -> str:
    return sampler_by_id(sampler_id).label


def scheduler_label(scheduler_id: str) -> str:
    return scheduler_by_id(scheduler_id).label


def valid_sampler_names() -> list[str]:
    return [s.label for s in SAMPLERS]


def valid_scheduler_names() -> list[str]:
    return [s.label for s in SCHEDULERS]


def _unknown_sampler(name: str, field: str) -> UnknownSampler:
    return UnknownSampler(
        f"Sampler not found: {name!r}. Valid samplers: {', '.join(valid_sampler_names())} "
        "(a scheduler suffix such as 'DPM++ 2M Karras' is also accepted)",
        field=field,
    )


def _unknown_scheduler(name: str, field: str) -> UnknownScheduler:
    return UnknownScheduler(
        f"Scheduler not found: {name!r}. Valid schedulers: "
        + ", ".join(f"{s.label} ({s.id})" for s in SCHEDULERS),
        field=field,
    )


def _split_sampler_name(name: str) -> tuple[SamplerName, SchedulerName | None] | None:
    """The sampler a name means, and the scheduler a legacy suffix or alias names (None: no suffix)."""
    found = _find_sampler(name)
    if found is not None:
        return found, None
    lowered = name.strip().lower()
    for scheduler in SCHEDULERS:
        for option in (scheduler.label, scheduler.id, *scheduler.aliases):
            suffix = " " + option.lower()
            if lowered.endswith(suffix):
                stem = _find_sampler(name.strip()[: -len(suffix)])
                if stem is not None:
                    return stem, scheduler
    for suffix, scheduler_id in _LEGACY_ALIAS_SUFFIXES:
        if lowered.endswith(suffix):
            stem = _find_sampler(lowered[: -len(suffix)])
            if stem is not None:
                return stem, scheduler_by_id(scheduler_id)
    return None


def _to_automatic(sampler: SamplerName, scheduler: SchedulerName) -> str:
    # As A1111's convert_automatic: the sampler's own default scheduler is stored as "automatic".
    return AUTOMATIC if sampler.option_scheduler == scheduler.id else scheduler.id


def resolve_scheduler(scheduler: str | None, *, field: str = "scheduler") -> str | None:
    """An explicit scheduler's internal id, or None when none was given (empty or null)."""
    if scheduler is None or not str(scheduler).strip():
        return None
    found = _find_scheduler(str(scheduler))
    if found is None:
        raise _unknown_scheduler(str(scheduler), field)
    return found.id


def resolve_sampler(
    sampler_name: str | None, sampler_index: str | None, scheduler: str | None
) -> tuple[str, str]:
    """A1111 request names → internal (sampler_id, scheduler_id).

    `sampler_name or sampler_index or "Euler"` names the sampler; a legacy suffix ("DPM++ 2M Karras",
    "Euler SGMUniform") picks the scheduler unless `scheduler` is given, which always wins. The scheduler
    that is the sampler's own default comes back as "automatic", as A1111 stores it.
    """
    field = "sampler_name" if sampler_name else "sampler_index"
    name = (sampler_name or sampler_index or DEFAULT_SAMPLER_LABEL).strip()
    explicit = resolve_scheduler(scheduler)
    split = _split_sampler_name(name)
    if split is None:
        raise _unknown_sampler(name, field if (sampler_name or sampler_index) else "sampler_name")
    sampler, suffix_scheduler = split
    if explicit is not None:
        return sampler.id, _to_automatic(sampler, scheduler_by_id(explicit))
    if suffix_scheduler is not None:
        return sampler.id, _to_automatic(sampler, suffix_scheduler)
    return sampler.id, AUTOMATIC


def resolve_hr_sampler(
    hr_sampler_name: str | None, hr_scheduler: str | None, base: tuple[str, str]
) -> tuple[str | None, str | None]:
    """Hires pass (sampler_id, scheduler_id); None means "the same as the first pass".

    A1111 treats null and "Use same sampler" / "Use same scheduler" as the same; unlike A1111 (which
    raises a 500), legacy bundled names are split here too.
    """
    sampler_given = bool(hr_sampler_name) and hr_sampler_name != USE_SAME_SAMPLER
    scheduler_given = bool(hr_scheduler) and hr_scheduler != USE_SAME_SCHEDULER
    scheduler_id = resolve_scheduler(hr_scheduler, field="hr_scheduler") if scheduler_given else None
    if not sampler_given:
        return None, scheduler_id
    split = _split_sampler_name(str(hr_sampler_name))
    if split is None:
        raise _unknown_sampler(str(hr_sampler_name), "hr_sampler_name")
    sampler, suffix = split
    if scheduler_id is None and suffix is not None:
        scheduler_id = _to_automatic(sampler, suffix)
    sampler_id = None if sampler.id == base[0] else sampler.id
    return sampler_id, scheduler_id


def default_scheduler_id(sampler_id: str) -> str:
    """The scheduler "automatic" means for a sampler: its A1111 option, else the model's uniform schedule."""
    return sampler_by_id(sampler_id).option_scheduler or "uniform"


def effective_scheduler_id(sampler_id: str, scheduler_id: str) -> str:
    return default_scheduler_id(sampler_id) if scheduler_id == AUTOMATIC else scheduler_id


def infotext_schedule_type(sampler_id: str, scheduler_id: str) -> str | None:
    """The `Schedule type` infotext value, or None to leave the key out.

    A1111 1.10 writes the label of the schedule the sampler really used when that is a named schedule
    (so plain "DPM++ 2M" shows `Schedule type: Karras`, as in A1111's own example), and an explicit
    scheduler by its label. For a sampler without a default schedule left on Automatic it writes
    "Automatic"; sdserver leaves the key out there (the parser's default is Automatic, so nothing is lost).
    """
    sampler = sampler_by_id(sampler_id)
    if scheduler_id != AUTOMATIC:
        return scheduler_label(scheduler_id)
    if sampler.option_scheduler is not None:
        return scheduler_label(sampler.option_scheduler)
    return None


def samplers_listing() -> list[dict[str, Any]]:
    return [{"name": s.label, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLERS]


def schedulers_listing() -> list[dict[str, Any]]:
    return [
        {
            "name": s.id,
            "label": s.label,
            "aliases": list(s.aliases) if s.aliases else None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULERS
    ]
