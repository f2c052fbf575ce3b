"""Sigma schedules ("schedulers"), with the semantics of A1111 1.10's `modules/sd_schedulers.py`.

Each function returns a float32 CPU tensor of decreasing sigmas, normally n+1 long and ending in 0.
Documented exceptions, as A1111: KL Optimal ends at sigma_min (no 0); DDIM takes every `1000 // n`-th model
sigma from index 1, which gives more than n steps when n does not divide 999 evenly.
Karras / exponential / polyexponential are k-diffusion's `get_sigmas_*` (MIT, Katherine Crowson).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from sdserver.sampling.discrete import DiscreteSchedule

# NVIDIA's published 10-step Align Your Steps sigmas (research.nvidia.com/labs/toronto-ai/AlignYourSteps).
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
# A1111's `beta_dist_alpha` / `beta_dist_beta` option defaults (from "Beta Sampling is All You Need").
BETA_DEFAULT_ALPHA = 0.6
BETA_DEFAULT_BETA = 0.6


@dataclass(frozen=True)
class ScheduleInputs:
    """Everything a scheduler may read. `rho` is None unless the user overrode the scheduler's default."""

    sigma_min: float
    sigma_max: float
    schedule: DiscreteSchedule
    rho: float | None = None
    family: str = "sd1"
    beta_alpha: float = BETA_DEFAULT_ALPHA
    beta_beta: float = BETA_DEFAULT_BETA


def _append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


def uniform(n: int, p: ScheduleInputs) -> Tensor:
    """The model default: n timesteps evenly spaced from the last to 0 (k-diffusion get_sigmas)."""
    return p.schedule.get_sigmas(n)


def karras(n: int, p: ScheduleInputs) -> Tensor:
    """Karras et al. (2022), eq. 5; rho = 7 unless overridden."""
    rho = 7.0 if p.rho is None else p.rho
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = p.sigma_min ** (1 / rho)
    max_inv_rho = p.sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, p: ScheduleInputs) -> Tensor:
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(p.sigma_max), math.log(p.sigma_min), n).exp())


def polyexponential(n: int, p: ScheduleInputs) -> Tensor:
    """A polynomial (power rho, default 1) in log sigma."""
    rho = 1.0 if p.rho is None else p.rho
    ramp = torch.linspace(1, 0, n) ** rho
    log_min = math.log(p.sigma_min)
    return _append_zero(torch.exp(ramp * (math.log(p.sigma_max) - log_min) + log_min))


def sgm_uniform(n: int, p: ScheduleInputs) -> Tensor:
    """n+1 timesteps evenly from t(sigma_max) to t(sigma_min), the last dropped, then 0."""
    start = p.schedule.sigma_to_t(torch.tensor(p.sigma_max))
    end = p.schedule.sigma_to_t(torch.tensor(p.sigma_min))
    ts = torch.linspace(start.item(), end.item(), n + 1)[:-1]
    return _append_zero(p.schedule.t_to_sigma(ts).float())


def normal(n: int, p: ScheduleInputs) -> Tensor:
    """n timesteps evenly from t(sigma_max) to t(sigma_min) inclusive, then 0."""
    start = p.schedule.sigma_to_t(torch.tensor(p.sigma_max))
    end = p.schedule.sigma_to_t(torch.tensor(p.sigma_min))
    ts = torch.linspace(start.item(), end.item(), n)
    return _append_zero(p.schedule.t_to_sigma(ts).float())


def kl_optimal(n: int, p: ScheduleInputs) -> Tensor:
    """tan of a linear ramp from atan(sigma_max) to atan(sigma_min); n+1 values ending at sigma_min."""
    alpha_min = torch.arctan(torch.tensor(p.sigma_min))
    alpha_max = torch.arctan(torch.tensor(p.sigma_max))
    steps = torch.arange(n + 1)
    return torch.tan(steps / n * alpha_min + (1.0 - steps / n) * alpha_max)


def _loglinear_interp(values: tuple[float, ...], num: int) -> np.ndarray:
    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values)[::-1])
    new_ys = np.interp(np.linspace(0, 1, num), xs, ys)
    return np.exp(new_ys)[::-1].copy()


def align_your_steps(n: int, p: ScheduleInputs) -> Tensor:
    """NVIDIA's 11-value table (SDXL or SD1.5), log-linearly resampled to n values, then 0.

    The table ignores the model's sigma range and any sigma_min/sigma_max override, as in A1111.
    """
    table = AYS_SDXL if p.family == "sdxl" else AYS_SD15
    values = np.asarray(table) if n == len(table) else _loglinear_interp(table, n)
    return torch.from_numpy(np.append(values, [0.0])).float()


def simple(n: int, p: ScheduleInputs) -> Tensor:
    """Every len(sigmas)/n-th model sigma, from the top."""
    sigmas = p.schedule.sigmas
    stride = len(sigmas) / n
    picked = [float(sigmas[-(1 + int(i * stride))]) for i in range(n)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def ddim(n: int, p: ScheduleInputs) -> Tensor:
    """Every (len(sigmas) // n)-th model sigma starting at index 1 (DDIM's timesteps), reversed, then 0."""
    sigmas = p.schedule.sigmas
    stride = max(len(sigmas) // n, 1)
    picked = [float(sigmas[i]) for i in range(1, len(sigmas), stride)]
    return torch.tensor(picked[::-1] + [0.0], dtype=torch.float32)


def beta(n: int, p: ScheduleInputs) -> Tensor:
    """Beta-distribution quantiles mapped linearly onto [sigma_min, sigma_max] (A1111's variant), then 0."""
    quantiles = [stats.beta.ppf(q, p.beta_alpha, p.beta_beta) for q in 1 - np.linspace(0, 1, n)]
    sigmas = [p.sigma_min + float(q) * (p.sigma_max - p.sigma_min) for q in quantiles]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def discard_next_to_last(sigmas: Tensor) -> Tensor:
    """Drop the penultimate sigma (A1111's `discard_next_to_last_sigma`, used by the DPM2 family)."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])
