"""DPM-Solver fast (fixed steps) and adaptive (error-controlled), after k-diffusion's DPMSolver (MIT,
Katherine Crowson), itself after Lu et al. 2022, https://arxiv.org/abs/2206.00927.

Both work in t = -log(sigma) between a sigma range, not on a schedule. A1111 runs them with eta = 1
(its `eta_ancestral`), so both are stochastic; the adaptive solver's error norm spans the whole batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from sdserver.sampling.samplers_k import Callback, ExtraArgs, OptionalNoise, get_ancestral_step

Model = Callable[..., Tensor]


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def _t(sigma: Tensor) -> Tensor:
    return -sigma.log()


class PIDStepSizeController:
    """PID control of the step size from the error estimate (k-diffusion)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float = 1,
                 accept_safety: float = 0.81, eps: float = 1e-8) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: Tensor) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class _Solver:
    def __init__(self, model: Model, extra_args: dict[str, Any]) -> None:
        self.model = model
        self.extra_args = extra_args

    def eps(self, cache: dict[str, Tensor], key: str, x: Tensor, t: Tensor) -> Tensor:
        if key not in cache:
            sigma = _sigma(t) * x.new_ones([x.shape[0]])
            cache[key] = (x - self.model(x, sigma, **self.extra_args)) / _sigma(t)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - _sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
              - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")


def _report(callback, x, i, t, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": _sigma(t), "sigma_hat": _sigma(t), "t": t, "denoised": denoised})


def sample_dpm_fast(model: Model, x: Tensor, sigma_min: float, sigma_max: float, n: int, *,
                    extra_args: ExtraArgs = None, callback: Callback = None,
                    noise_sampler: OptionalNoise = None, eta: float = 0.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-Fast: n model evaluations split into order-3 steps (then 2, 1) evenly in log sigma."""
    _check_range(float(sigma_min), float(sigma_max))
    solver = _Solver(model, extra_args or {})
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start.item(), t_end.item(), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        cache: dict[str, Tensor] = {}
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = torch.minimum(t_end, _t(sd))
            su = (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        eps = solver.eps(cache, "eps", x, t)
        _report(callback, x, i, t, x - _sigma(t) * eps)
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_next_, cache)
        if noise_sampler is None:
            if eta:
                raise ValueError("DPM fast with eta > 0 needs a noise_sampler")
        else:
            x = x + su * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
    return x


def sample_dpm_adaptive(model: Model, x: Tensor, sigma_min: float, sigma_max: float, *,
                        extra_args: ExtraArgs = None, callback: Callback = None,
                        noise_sampler: OptionalNoise = None, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0,
                        dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0,
                        s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-12/23 with PID step-size control; the number of steps is chosen by the error estimate."""
    _check_range(float(sigma_min), float(sigma_max))
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    if eta and noise_sampler is None:
        raise ValueError("DPM adaptive with eta > 0 needs a noise_sampler")
    solver = _Solver(model, extra_args or {})
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    s = t_start
    x_prev = x
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    attempts = 0
    while s < t_end - 1e-5:
        cache: dict[str, Tensor] = {}
        t = torch.minimum(t_end, s + pid.h)
        if eta:
            sd, _ = get_ancestral_step(_sigma(s), _sigma(t), eta)
            t_ = torch.minimum(t_end, _t(sd))
            su = (_sigma(t) ** 2 - _sigma(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - _sigma(s) * eps
        if order == 2:
            x_low = solver.step_1(x, s, t_, cache)
            x_high = solver.step_2(x, s, t_, cache)
        else:
            x_low = solver.step_2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if noise_sampler is not None:
                x = x + su * s_noise * noise_sampler(_sigma(s), _sigma(t))
            s = t
        attempts += 1
        _report(callback, x, attempts - 1, s, denoised)
    return x
