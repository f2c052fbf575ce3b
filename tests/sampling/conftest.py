"""Shared fixtures: SD's noise schedule and the ideal denoiser for Gaussian data."""

from __future__ import annotations

import pytest
import torch

from sdserver.sampling.discrete import DiscreteSchedule

# SD 1.x/2.x/XL training schedule: "scaled linear" betas from 0.00085 to 0.012 over 1000 steps.
SD_BETA_START, SD_BETA_END, SD_STEPS = 0.00085, 0.012, 1000


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, SD_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


@pytest.fixture(scope="session")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule(sd_alphas_cumprod())


class GaussianDenoiser:
    """The exact denoiser for data ~ N(0, s^2 I): E[x0 | x0 + sigma n = x] = x s^2 / (s^2 + sigma^2).

    Counts its calls; `denoise_with_uncond` treats a second Gaussian of std `s_uncond` as the uncond branch.
    """

    def __init__(self, s: float = 1.0, s_uncond: float | None = None) -> None:
        self.s2 = s * s
        self.s2_uncond = None if s_uncond is None else s_uncond * s_uncond
        self.calls = 0

    def _d(self, x: torch.Tensor, sigma: torch.Tensor, s2: float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
        return x * s2 / (s2 + sigma**2)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        self.calls += 1
        return self._d(x, sigma, self.s2)

    def denoise_with_uncond(self, x, sigma, *, cond_scale_multiplier, cond_scale=1.0, **extra):
        self.calls += 1
        s2_uncond = self.s2 if self.s2_uncond is None else self.s2_uncond
        cond, uncond = self._d(x, sigma, self.s2), self._d(x, sigma, s2_uncond)
        return uncond + (cond - uncond) * (cond_scale * cond_scale_multiplier), uncond


@pytest.fixture
def gaussian() -> type[GaussianDenoiser]:
    return GaussianDenoiser
