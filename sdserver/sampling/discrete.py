"""Discrete-time (DDPM) noise schedules and the denoiser wrappers that turn a UNet into `D(x, sigma)`.

The sigma <-> timestep maps and the eps / v scalings re-implement k-diffusion's `external.py`
(DiscreteSchedule, DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser; MIT, Katherine Crowson), in float32
exactly as A1111 1.10 runs them, so schedules built here equal A1111's bit for bit on the CPU.
`LCMSchedule` / `LCMDenoiser` follow the facts of A1111's `sd_samplers_lcm.py` (50 "original" timesteps,
quantised timesteps and the consistency-model boundary scalings).

Convention ("VE"): a latent at noise level sigma is `x = x0 + sigma * eps`. The UNet sees the "VP" latent
`x_t = x / sqrt(1 + sigma^2)` together with the timestep `t = sigma_to_t(sigma)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch
from torch import Tensor

# SD's UNet was trained on 1000 DDPM steps; LCM distils that onto 50 "original" steps (A1111 sd_samplers_lcm).
LCM_ORIGINAL_STEPS = 50
# The consistency-model boundary condition of LCM uses sigma_data = 0.5 and timesteps scaled by 10.
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALE = 10.0

Prediction = Literal["eps", "v"]
ModelFn = Callable[..., Tensor]


def _append_dims(v: Tensor, ndim: int) -> Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def _batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Samplers pass one sigma per image (shape [B]); accept a scalar too."""
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


@dataclass(frozen=True)
class DiscreteSchedule:
    """The model's sigma table, built from `alphas_cumprod` (float32, 1000 entries for SD)."""

    alphas_cumprod: Tensor
    sigmas: Tensor = field(init=False)  # ascending: sigmas[t] is the noise level of timestep t
    log_sigmas: Tensor = field(init=False)

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod.detach().to(device="cpu", dtype=torch.float32)
        object.__setattr__(self, "alphas_cumprod", ac)
        sigmas = ((1 - ac) / ac) ** 0.5
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", sigmas.log())

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep by linear interpolation in log-sigma (k-diffusion, not quantised)."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).float()
        log_sigmas = self.log_sigmas.to(t.device)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
        return log_sigma.exp()

    def model_timestep(self, sigma: Tensor) -> Tensor:
        """The timestep handed to the UNet for `sigma`."""
        return self.sigma_to_t(sigma)

    def get_sigmas(self, n: int) -> Tensor:
        """The model default ("Uniform") schedule: n timesteps evenly from the last to 0, then 0."""
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return _append_zero(self.t_to_sigma(t))

    def timestep_of(self, sigma: float | Tensor) -> int:
        """The integer timestep whose table sigma is `sigma` (exact for values taken from `sigmas`)."""
        return int((self.sigmas - torch.as_tensor(sigma, dtype=torch.float32)).abs().argmin())

    def lcm(self) -> LCMSchedule:
        return LCMSchedule(self.alphas_cumprod)


@dataclass(frozen=True)
class LCMSchedule(DiscreteSchedule):
    """A1111's LCM view of the model: the 50 timesteps 19, 39, ..., 999 and quantised timesteps."""

    full_alphas_cumprod: Tensor = field(init=False)

    def __post_init__(self) -> None:
        full = self.alphas_cumprod.detach().to(device="cpu", dtype=torch.float32)
        n_full = len(full)
        skip = n_full // LCM_ORIGINAL_STEPS
        valid = torch.stack([full[n_full - 1 - i * skip] for i in range(LCM_ORIGINAL_STEPS)]).flip(0)
        object.__setattr__(self, "full_alphas_cumprod", full)
        object.__setattr__(self, "alphas_cumprod", valid)
        super().__post_init__()

    @property
    def skip_steps(self) -> int:
        return len(self.full_alphas_cumprod) // LCM_ORIGINAL_STEPS

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma)
        dists = sigma.log() - self.log_sigmas.to(sigma.device)[:, None]
        idx = dists.abs().argmin(dim=0).view(sigma.shape)
        return idx * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        index = ((t - (self.skip_steps - 1)) / self.skip_steps).float().clamp(0, len(self.sigmas) - 1)
        return super().t_to_sigma(index)

    def get_sigmas(self, n: int) -> Tensor:
        start = self.sigma_to_t(torch.tensor(self.sigma_max))
        end = self.sigma_to_t(torch.tensor(self.sigma_min))
        t = torch.linspace(start.item(), end.item(), n)
        return _append_zero(self.t_to_sigma(t))


def _append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


class DenoiserFn(Protocol):
    """What every sampler calls: the denoised estimate of `x` at noise level `sigma` (shape [B])."""

    def __call__(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor: ...


class GuidedDenoiserFn(DenoiserFn, Protocol):
    """A CFG denoiser that can also report its unconditional prediction (needed by DDIM CFG++).

    `denoise_with_uncond(x, sigma, cond_scale_multiplier=m, **extra)` returns `(guided, uncond)`:
    `guided` is the usual CFG result computed with `cond_scale * m` (A1111's `cond_scale_miltiplier`),
    `uncond` the denoised estimate of the unconditional (negative prompt) branch of the same call.
    """

    def denoise_with_uncond(
        self, x: Tensor, sigma: Tensor, *, cond_scale_multiplier: float, **extra: Any
    ) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Denoiser:
    """`D(x, sigma)` around a UNet call `model_fn(x_t, t, **extra)` that predicts eps or v.

    eps: D = x - sigma * eps(x / sqrt(1+sigma^2), t)            (k-diffusion DiscreteEpsDDPMDenoiser)
    v:   D = x / (1+sigma^2) - sigma / sqrt(1+sigma^2) * v(...)   (k-diffusion DiscreteVDDPMDenoiser)
    """

    model_fn: ModelFn
    schedule: DiscreteSchedule
    prediction: Prediction = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")

    def __call__(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        sigma = _batch_sigma(sigma, x)
        c_in = _append_dims(1 / (sigma**2 + 1) ** 0.5, x.ndim)
        out = self.model_fn(x * c_in, self.schedule.model_timestep(sigma), **extra)
        if self.prediction == "eps":
            return x + out * _append_dims(-sigma, x.ndim)
        c_skip = _append_dims(1 / (sigma**2 + 1), x.ndim)
        c_out = _append_dims(-sigma / (sigma**2 + 1) ** 0.5, x.ndim)
        return out * c_out + x * c_skip

    def get_eps(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        """The noise estimate in VE terms: (x - D(x, sigma)) / sigma."""
        sigma = _batch_sigma(sigma, x)
        return (x - self(x, sigma, **extra)) / _append_dims(sigma, x.ndim)


@dataclass(frozen=True)
class LCMDenoiser:
    """A1111's LCM denoiser: eps model at the quantised LCM timestep, then the consistency boundary mix.

    A1111 treats the UNet output as eps even for v-prediction models; so does this.
    """

    model_fn: ModelFn
    schedule: LCMSchedule

    def __call__(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        sigma = _batch_sigma(sigma, x)
        t = self.schedule.sigma_to_t(sigma)
        c_in = _append_dims(1 / (sigma**2 + 1) ** 0.5, x.ndim)
        eps = self.model_fn(x * c_in, t, **extra)
        denoised = x + eps * _append_dims(-sigma, x.ndim)
        scaled_t = _append_dims(t, x.ndim) * LCM_TIMESTEP_SCALE
        c_skip = LCM_SIGMA_DATA**2 / (scaled_t**2 + LCM_SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + LCM_SIGMA_DATA**2) ** 0.5
        return c_out * denoised + c_skip * x
