"""Timestep samplers DDIM, DDIM CFG++ and PLMS, with A1111 1.10's semantics (`sd_samplers_timesteps_impl.py`).

They walk integer DDPM timesteps in "VP" space (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps) and take the UNet's
eps through the same sigma-space denoiser as every other sampler: at timestep t the denoiser is called at
sigma_t = sigmas[t] on x_VE = x_t * sqrt(1 + sigma_t^2) and eps = (x_VE - D) / sigma_t, which is exactly the
eps the UNet returns for (x_t, t); CFG mixing is affine, so mixing denoised values equals mixing eps.

A1111 quirks kept on purpose: the loop runs len(timesteps) - 1 model calls from the last timestep down to
the second and lands on the first one (t = 1 for txt2img), whose x_t is returned (not x0); alphas_prev is
float64; the step noise is drawn on every step (multiplied by sigma_t, 0 when eta = 0).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sdserver.sampling.discrete import DiscreteSchedule
from sdserver.sampling.noise import NoiseSampler
from sdserver.sampling.samplers_k import Callback, ExtraArgs, OptionalNoise

Model = Callable[..., Tensor]
# DDIM CFG++ maps A1111's CFG scale range [0, 12.5] onto the method's guidance range [0, 1].
CFGPP_SCALE_DIVISOR = 12.5


def _ve_input(x_vp: Tensor, sigma: Tensor) -> Tensor:
    return x_vp * (sigma**2 + 1) ** 0.5


def eps_at_timestep(model: Model, x_vp: Tensor, t: int, schedule: DiscreteSchedule,
                    extra_args: dict[str, Any]) -> Tensor:
    """The (guided) UNet eps for the VP latent `x_vp` at integer timestep `t`."""
    sigma = schedule.sigmas[t].to(x_vp.device)
    x_ve = _ve_input(x_vp, sigma)
    return (x_ve - model(x_ve, sigma * x_vp.new_ones([x_vp.shape[0]]), **extra_args)) / sigma


def eps_and_uncond_at_timestep(model: Model, x_vp: Tensor, t: int, schedule: DiscreteSchedule,
                               extra_args: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Guided eps at CFG scale / 12.5 and the unconditional eps, for DDIM CFG++.

    Uses `model.denoise_with_uncond` (see discrete.GuidedDenoiserFn); a model without it is unguided, so its
    unconditional prediction is its only prediction.
    """
    sigma = schedule.sigmas[t].to(x_vp.device)
    x_ve = _ve_input(x_vp, sigma)
    sigma_in = sigma * x_vp.new_ones([x_vp.shape[0]])
    with_uncond = getattr(model, "denoise_with_uncond", None)
    if with_uncond is None:
        guided = uncond = model(x_ve, sigma_in, **extra_args)
    else:
        guided, uncond = with_uncond(x_ve, sigma_in, cond_scale_multiplier=1 / CFGPP_SCALE_DIVISOR, **extra_args)
    return (x_ve - guided) / sigma, (x_ve - uncond) / sigma


class _Alphas:
    """A1111's per-run tables: alphas at the timesteps (float32), alphas_prev (float64), DDIM sigmas."""

    def __init__(self, schedule: DiscreteSchedule, timesteps: Sequence[int], eta: float) -> None:
        ts = torch.as_tensor(list(timesteps), dtype=torch.long)
        ac = schedule.alphas_cumprod
        self.alphas = ac[ts]
        self.alphas_prev = ac[torch.nn.functional.pad(ts[:-1], pad=(1, 0))].to(torch.float64)
        self.sqrt_one_minus_alphas = torch.sqrt(1 - self.alphas)
        a, a_prev = self.alphas.double().numpy(), self.alphas_prev.numpy()
        self.sigmas = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))


def _report(callback, i: int, x: Tensor, sigma: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _ddim_loop(eps_fn, x: Tensor, timesteps: Sequence[int], schedule: DiscreteSchedule, callback,
               noise_sampler: NoiseSampler | None, eta: float) -> Tensor:
    tables = _Alphas(schedule, timesteps, eta)
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t, e_dir = eps_fn(x, int(timesteps[index]))
        a_t = tables.alphas[index].item() * s_x
        a_prev = tables.alphas_prev[index].item() * s_x
        sigma_t = tables.sigmas[index].item() * s_x
        sqrt_one_minus_at = tables.sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_dir
        if noise_sampler is None:
            if eta:
                raise ValueError("DDIM with eta > 0 needs a noise_sampler")
            noise = torch.zeros_like(x)
        else:
            sigma = schedule.sigmas[int(timesteps[index])]
            noise = sigma_t * noise_sampler(sigma, sigma)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
        _report(callback, i, x, schedule.sigmas[int(timesteps[index])], pred_x0)
    return x


def sample_ddim(model: Model, x: Tensor, timesteps: Sequence[int], *, schedule: DiscreteSchedule,
                extra_args: ExtraArgs = None, callback: Callback = None, noise_sampler: OptionalNoise = None,
                eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2020) over ascending integer `timesteps`; `x` is the VP latent. Returns VP x."""
    extra_args = extra_args or {}

    def eps_fn(x_vp: Tensor, t: int) -> tuple[Tensor, Tensor]:
        e = eps_at_timestep(model, x_vp, t, schedule, extra_args)
        return e, e

    return _ddim_loop(eps_fn, x, timesteps, schedule, callback, noise_sampler, eta)


def sample_ddim_cfgpp(model: Model, x: Tensor, timesteps: Sequence[int], *, schedule: DiscreteSchedule,
                      extra_args: ExtraArgs = None, callback: Callback = None,
                      noise_sampler: OptionalNoise = None, eta: float = 0.0) -> Tensor:
    """DDIM with CFG++ (Chung et al. 2024): x0 from the guided eps (CFG scale / 12.5), the direction to x_t
    from the unconditional eps."""
    extra_args = extra_args or {}
    return _ddim_loop(lambda x_vp, t: eps_and_uncond_at_timestep(model, x_vp, t, schedule, extra_args),
                      x, timesteps, schedule, callback, noise_sampler, eta)


def sample_plms(model: Model, x: Tensor, timesteps: Sequence[int], *, schedule: DiscreteSchedule,
                extra_args: ExtraArgs = None, callback: Callback = None,
                noise_sampler: OptionalNoise = None) -> Tensor:
    """PLMS (Liu et al. 2022): a pseudo improved-Euler first step, then Adams-Bashforth of order 2 to 4 in eps."""
    extra_args = extra_args or {}
    tables = _Alphas(schedule, timesteps, 0.0)
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps: list[Tensor] = []

    def x_prev_and_pred_x0(x: Tensor, e_t: Tensor, index: int) -> tuple[Tensor, Tensor]:
        a_t = tables.alphas[index].item() * s_x
        a_prev = tables.alphas_prev[index].item() * s_x
        sqrt_one_minus_at = tables.sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t, t_next = int(timesteps[index]), int(timesteps[max(index - 1, 0)])
        e_t = eps_at_timestep(model, x, t, schedule, extra_args)
        if not old_eps:
            x_prev, _ = x_prev_and_pred_x0(x, e_t, index)
            e_t_next = eps_at_timestep(model, x_prev, t_next, schedule, extra_args)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
        _report(callback, i, x, schedule.sigmas[t], pred_x0)
    return x
