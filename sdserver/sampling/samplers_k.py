"""k-diffusion samplers: `sample_x(model, x, sigmas, *, extra_args, callback, noise_sampler, ...) -> x`.

Re-implemented from k-diffusion's `sampling.py` (MIT, Katherine Crowson; the revision A1111 1.10 pins,
ab527a9), with A1111's own `restart_sampler` (sd_samplers_extra.py) and `sample_lcm` (sd_samplers_lcm.py)
written from their published semantics. `model(x, sigma[B], **extra_args)` returns the denoised estimate;
`x` is the VE latent at `sigmas[0]`. No sampler draws random numbers itself: noise comes from
`noise_sampler(sigma, sigma_next)`, which A1111 backs with the image RNG (ancestral / churn noise) or a
Brownian tree (SDE samplers). Samplers that use noise raise if none was given.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from scipy import integrate
from torch import Tensor

from sdserver.sampling.noise import NoiseSampler

Model = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None] | None
ExtraArgs = dict[str, Any] | None
OptionalNoise = NoiseSampler | None


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The Karras ODE derivative dx/dsigma."""
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """sigma_down to step to deterministically and sigma_up of fresh noise to add (eta scales the noise)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _need(noise_sampler: NoiseSampler | None, who: str) -> NoiseSampler:
    if noise_sampler is None:
        raise ValueError(f"{who} needs a noise_sampler")
    return noise_sampler


def _add_noise(x: Tensor, noise_sampler: NoiseSampler | None, who: str, sigma: Tensor, sigma_next: Tensor,
               *factors: Any) -> Tensor:
    """x + noise * f1 * f2 (in k-diffusion's order, for identical rounding). With a noise sampler the noise is
    drawn even when a factor is 0, as k-diffusion does, so the image generators advance identically; without
    one, a zero factor needs no noise."""
    if noise_sampler is None and any(not torch.is_tensor(f) and f == 0 for f in factors):
        return x
    noise = _need(noise_sampler, who)(sigma, sigma_next)
    for f in factors:
        noise = noise * f
    return x + noise


def _report(callback: Callback, i: int, x: Tensor, sigma: Tensor, sigma_hat: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x: Tensor, sigmas: Tensor, i: int, noise_sampler: OptionalNoise, s_churn: float, s_tmin: float,
           s_tmax: float, s_noise: float) -> tuple[Tensor, Tensor]:
    """Karras' stochastic churn: raise sigma to sigma_hat by adding noise. k-diffusion draws the noise on
    every step, used or not, so the image generators advance the same way as in A1111."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    eps = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise if noise_sampler is not None else None
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        if eps is None:
            raise ValueError("s_churn > 0 needs a noise_sampler")
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def sample_euler(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                 callback: Callback = None, noise_sampler: OptionalNoise = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Karras et al. (2022) Algorithm 2 with Euler steps."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                           callback: Callback = None, noise_sampler: OptionalNoise = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with Euler steps."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = _add_noise(x, noise_sampler, "Euler a", sigmas[i], sigmas[i + 1], s_noise, sigma_up)
    return x


def sample_heun(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                callback: Callback = None, noise_sampler: OptionalNoise = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Karras et al. (2022) Algorithm 2 with Heun steps (Euler on the last step to 0)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm_2(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                 callback: Callback = None, noise_sampler: OptionalNoise = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 style midpoint steps (midpoint in log sigma) with Karras churn."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


def sample_dpm_2_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                           callback: Callback = None, noise_sampler: OptionalNoise = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 midpoint steps."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = _add_noise(x, noise_sampler, "DPM2 a", sigmas[i], sigmas[i + 1], s_noise, sigma_up)
    return x


def linear_multistep_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial j through t[i], ..., t[i-order+1].

    Integrated numerically with scipy's quad exactly as k-diffusion does (float32 knots), which keeps LMS
    bit-identical to A1111; the integrand is a polynomial of degree < 4, so this is the exact integral.
    """
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def sample_lms(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
               callback: Callback = None, noise_sampler: OptionalNoise = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) of order up to 4."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().float().numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def _sigma_fn(t: Tensor) -> Tensor:
    return t.neg().exp()


def _t_fn(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def sample_dpmpp_2s_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                              callback: Callback = None, noise_sampler: OptionalNoise = None, eta: float = 1.0,
                              s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = _add_noise(x, noise_sampler, "DPM++ 2S a", sigmas[i], sigmas[i + 1], s_noise, sigma_up)
    return x


def sample_dpmpp_sde(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                     callback: Callback = None, noise_sampler: OptionalNoise = None, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 1 / 2) -> Tensor:
    """DPM-Solver++ (stochastic), two model calls per step."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = _add_noise(x_2, noise_sampler, "DPM++ SDE", _sigma_fn(t), _sigma_fn(s), s_noise, su)
        denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = _add_noise(x, noise_sampler, "DPM++ SDE", _sigma_fn(t), _sigma_fn(t_next), s_noise, su)
    return x


def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                    callback: Callback = None, noise_sampler: OptionalNoise = None) -> Tensor:
    """DPM-Solver++(2M), deterministic multistep."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                        callback: Callback = None, noise_sampler: OptionalNoise = None, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE; `solver_type` "midpoint" (DPM++ 2M SDE) or "heun" (DPM++ 2M SDE Heun)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = _need(noise_sampler, "DPM++ 2M SDE")(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_3m_sde(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                        callback: Callback = None, noise_sampler: OptionalNoise = None, eta: float = 1.0,
                        s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    denoised_1 = denoised_2 = None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (h_eta.neg().expm1() / h_eta + 1) * d
            if eta:
                noise = _need(noise_sampler, "DPM++ 3M SDE")(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# A1111's automatic restart plan: from 20 steps on, 9 restart steps once between sigma 0.1 and 2; from 36 on,
# steps // 4 restart steps twice (Xu et al. 2023, "Restart Sampling for Improving Generative Processes").
_RESTART_MIN_STEPS, _RESTART_TWICE_STEPS = 20, 36
_RESTART_SIGMA_MIN, _RESTART_SIGMA_MAX = 0.1, 2.0


def _restart_step_list(sigmas: Tensor) -> list[tuple[Tensor, Tensor]]:
    steps = sigmas.shape[0] - 1
    restart_list: dict[int, tuple[int, int, float]] = {}
    if steps >= _RESTART_MIN_STEPS:
        restart_steps, restart_times = 9, 1
        if steps >= _RESTART_TWICE_STEPS:
            restart_steps, restart_times = steps // 4, 2
        n_main = steps - restart_steps * restart_times
        sigmas = get_sigmas_karras(n_main, sigmas[-2].item(), sigmas[0].item()).to(sigmas.device)
        at = int(torch.argmin(abs(sigmas - _RESTART_SIGMA_MIN), dim=0))
        restart_list = {at: (restart_steps + 1, restart_times, _RESTART_SIGMA_MAX)}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                lo, hi = sigmas[min_idx].item(), sigmas[max_idx].item()
                sigma_restart = get_sigmas_karras(restart_steps, lo, hi).to(sigmas.device)[:-1]
                for _ in range(restart_times):
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:]))
    return step_list


def sample_restart(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
                   callback: Callback = None, noise_sampler: OptionalNoise = None,
                   s_noise: float = 1.0) -> Tensor:
    """A1111's Restart sampler: Heun steps on a Karras schedule with re-noised restart segments.

    Like A1111, from 20 steps on it replaces the given schedule by a Karras one over the same range.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    last_sigma = None
    for step_id, (old_sigma, new_sigma) in enumerate(_restart_step_list(sigmas)):
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            noise = _need(noise_sampler, "Restart")(old_sigma, last_sigma)
            x = x + noise * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        denoised = model(x, old_sigma * s_in, **extra_args)
        d = to_d(x, old_sigma, denoised)
        _report(callback, step_id, x, new_sigma, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, new_sigma, model(x_2, new_sigma * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
        last_sigma = new_sigma
    return x


def sample_lcm(model: Model, x: Tensor, sigmas: Tensor, *, extra_args: ExtraArgs = None,
               callback: Callback = None, noise_sampler: OptionalNoise = None) -> Tensor:
    """Latent Consistency Model sampling: jump to the denoised estimate, re-noise to the next sigma."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * _need(noise_sampler, "LCM")(sigmas[i], sigmas[i + 1])
    return x
