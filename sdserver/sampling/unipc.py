"""UniPC multistep sampler (Zhao et al. 2023, https://arxiv.org/abs/2302.04867), data-prediction form with
the B(h) variants, as A1111 1.10 runs it (`modules/models/diffusion/uni_pc`, `sd_samplers_timesteps_impl.unipc`).

Time is continuous t in [1/N, 1] over the discrete DDPM schedule (log alpha linearly interpolated between
t_n = (n + 1) / N); the UNet gets t_model = (t - 1/N) * 1000, usually fractional. Like DDIM here, the eps comes
through the sigma-space denoiser at sigma = schedule.t_to_sigma(t_model). A1111 options and defaults:
variant "bh1", skip type "time_uniform", order 3, lower order final steps on.

v-prediction: A1111 converts the UNet's v to eps with alphas_cumprod at the timestep truncated to an integer,
eps = sqrt(a[int(t_model)]) v + sqrt(1 - a[int(t_model)]) x_t, not at the interpolated noise level the
sigma-space denoiser uses; so for v models the v is recovered from the denoised value (an affine map, which
commutes with CFG's mixing) and converted the A1111 way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from sdserver.sampling.discrete import DiscreteSchedule, Prediction
from sdserver.sampling.samplers_k import Callback, ExtraArgs, OptionalNoise

Model = Callable[..., Tensor]
SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")
VARIANTS = ("bh1", "bh2", "vary_coeff")


def _interp(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear y(x) through increasing keypoints xp, extended linearly beyond both ends."""
    k = torch.searchsorted(xp, x.contiguous(), right=True) - 1
    k = k.clamp(0, xp.shape[0] - 2)
    x0, x1, y0, y1 = xp[k], xp[k + 1], yp[k], yp[k + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseScheduleVP:
    """The discrete VP schedule in continuous time (DPM-Solver / UniPC 'discrete' mode)."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        log_alphas = 0.5 * torch.log(alphas_cumprod.float())
        self.total_n = len(log_alphas)
        self.T = 1.0
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:]
        self.log_alpha_array = log_alphas

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        return _interp(t.reshape(-1), self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def marginal_alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: Tensor) -> Tensor:
        log_mean = self.marginal_log_mean_coeff(t)
        return log_mean - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))

    def inverse_lambda(self, lamb: Tensor) -> Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,), device=lamb.device), -2.0 * lamb)
        xp = torch.flip(self.log_alpha_array.to(lamb.device), [0])
        yp = torch.flip(self.t_array.to(lamb.device), [0])
        return _interp(log_alpha.reshape(-1), xp, yp)

    def model_time(self, t: Tensor) -> Tensor:
        return (t - 1.0 / self.total_n) * 1000.0


def time_steps(ns: NoiseScheduleVP, skip_type: str, t_T: Tensor | float, t_0: float, n: int) -> Tensor:
    if skip_type == "logSNR":
        lambda_T = ns.marginal_lambda(torch.as_tensor(t_T))
        lambda_0 = ns.marginal_lambda(torch.as_tensor(t_0))
        return ns.inverse_lambda(torch.linspace(lambda_T.item(), lambda_0.item(), n + 1))
    if skip_type == "time_uniform":
        return torch.linspace(float(t_T), t_0, n + 1)
    if skip_type == "time_quadratic":
        return torch.linspace(float(t_T) ** 0.5, t_0**0.5, n + 1).pow(2)
    raise ValueError(f"unknown UniPC skip type {skip_type!r}; expected one of {SKIP_TYPES}")


def _expand(v: Tensor, dims: int) -> Tensor:
    return v[(...,) + (None,) * (dims - 1)]


def v_from_denoised(x_vp: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """The v a v-prediction UNet gave, from the denoised value of the VE latent x_vp * sqrt(1 + sigma^2)
    (inverts `discrete.Denoiser`'s v scalings)."""
    scale = _expand((sigma**2 + 1) ** 0.5, x_vp.dim())
    return (x_vp - denoised * scale) / _expand(sigma, x_vp.dim())


def eps_from_v_truncated(x_vp: Tensor, v: Tensor, t_model: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """A1111's v -> eps for timestep samplers: alphas_cumprod at int(t_model), truncated, not interpolated."""
    index = t_model.to(torch.int).long().cpu()
    sqrt_a = torch.sqrt(alphas_cumprod)[index].to(x_vp.device)
    sqrt_1ma = torch.sqrt(1 - alphas_cumprod)[index].to(x_vp.device)
    return _expand(sqrt_a, x_vp.dim()) * v + _expand(sqrt_1ma, x_vp.dim()) * x_vp


class _UniPC:
    def __init__(self, model: Model, schedule: DiscreteSchedule, ns: NoiseScheduleVP, extra_args: dict[str, Any],
                 variant: str, prediction: Prediction = "eps") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown UniPC variant {variant!r}; expected one of {VARIANTS}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.model, self.schedule, self.ns, self.extra_args, self.variant = model, schedule, ns, extra_args, variant
        self.prediction = prediction

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        t_model = self.ns.model_time(t).clamp(0, len(self.schedule.sigmas) - 1)
        sigma = self.schedule.t_to_sigma(t_model).to(x.device)
        scale = _expand((sigma**2 + 1) ** 0.5, x.dim())
        denoised = self.model(x * scale, sigma, **self.extra_args)
        if self.prediction == "eps":
            return (x * scale - denoised) / _expand(sigma, x.dim())
        return eps_from_v_truncated(x, v_from_denoised(x, denoised, sigma), t_model, self.schedule.alphas_cumprod)

    def data_prediction(self, x: Tensor, t: Tensor) -> Tensor:
        noise = self.eps(x, t)
        alpha_t, sigma_t = self.ns.marginal_alpha(t), self.ns.marginal_std(t)
        return (x - _expand(sigma_t, x.dim()) * noise) / _expand(alpha_t, x.dim())

    def update(self, x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor, order: int,
               use_corrector: bool) -> tuple[Tensor, Tensor | None]:
        if self.variant == "vary_coeff":
            return self.update_vary_coeff(x, model_prev, t_prev, t, order, use_corrector)
        return self.update_bh(x, model_prev, t_prev, t, order, use_corrector)

    def update_vary_coeff(self, x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor, order: int,
                          use_corrector: bool) -> tuple[Tensor, Tensor | None]:
        """UniPC with varying coefficients (UniC-p with the inverse of the Vandermonde-like matrix C).

        A1111's version only runs with batch size 1 (it mixes per-image scalars with the width axis); here
        the per-image scalars are broadcast over the image, which is the same thing for one image.
        """
        ns, dims = self.ns, x.dim()
        t_prev_0, model_prev_0 = t_prev[-1], model_prev[-1]
        lambda_prev_0 = ns.marginal_lambda(t_prev_0)
        h = ns.marginal_lambda(t) - lambda_prev_0
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
        rks, d1s = [], []
        for i in range(1, order):
            rk = ((ns.marginal_lambda(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks.append(1.0)
        rks_t = torch.tensor(rks, device=x.device)
        k_len = len(rks_t)
        cols, col = [], torch.ones_like(rks_t)
        for k in range(1, k_len + 1):
            cols.append(col)
            col = col * rks_t / (k + 1)
        c_mat = torch.stack(cols, dim=1)
        hh = -h[0]
        h_phi_ks, h_phi_k, factorial_k = [], torch.expm1(hh), 1
        for k in range(1, k_len + 2):
            h_phi_ks.append(h_phi_k)
            h_phi_k = h_phi_k / hh - 1 / factorial_k
            factorial_k *= k + 1
        a_t = _expand(alpha_t, dims)
        x_t_ = _expand(sigma_t / sigma_prev_0, dims) * x - a_t * h_phi_ks[0] * model_prev_0
        x_t = x_t_
        if d1s:
            d1s_t = torch.stack(d1s, dim=1)
            a_p = torch.linalg.inv(c_mat[:-1, :-1])
            for k in range(k_len - 1):
                x_t = x_t - a_t * h_phi_ks[k + 1] * torch.einsum("bk...,k->b...", d1s_t, a_p[k])
        model_t = None
        if use_corrector:
            a_c = torch.linalg.inv(c_mat)
            model_t = self.data_prediction(x_t, t)
            x_t = x_t_
            k = 0
            for k in range(k_len - 1):
                x_t = x_t - a_t * h_phi_ks[k + 1] * torch.einsum("bk...,k->b...", d1s_t, a_c[k][:-1])
            x_t = x_t - a_t * h_phi_ks[k_len] * ((model_t - model_prev_0) * a_c[k][-1])
        return x_t, model_t

    def update_bh(self, x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor, order: int,
                  use_corrector: bool) -> tuple[Tensor, Tensor | None]:
        ns, dims = self.ns, x.dim()
        t_prev_0 = t_prev[-1]
        lambda_prev_0, lambda_t = ns.marginal_lambda(t_prev_0), ns.marginal_lambda(t)
        model_prev_0 = model_prev[-1]
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
        h = lambda_t - lambda_prev_0

        rks, d1s = [], []
        for i in range(1, order):
            rk = ((ns.marginal_lambda(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks.append(1.0)
        rks_t = torch.tensor(rks, device=x.device)

        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rows, b = [], []
        factorial_i = 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rks_t, i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r_mat = torch.stack(rows)
        b_t = torch.tensor(b, device=x.device)

        d1s_t = torch.stack(d1s, dim=1) if d1s else None
        if d1s_t is not None:
            if order == 2:
                rhos_p = torch.tensor([0.5], device=x.device)
            else:
                rhos_p = torch.linalg.solve(r_mat[:-1, :-1], b_t[:-1])
        if use_corrector:
            rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_mat, b_t)

        x_t_ = _expand(sigma_t / sigma_prev_0, dims) * x - _expand(alpha_t * h_phi_1, dims) * model_prev_0
        pred_res = torch.einsum("k,bk...->b...", rhos_p, d1s_t) if d1s_t is not None else 0
        x_t = x_t_ - _expand(alpha_t * b_h, dims) * pred_res
        model_t = None
        if use_corrector:
            model_t = self.data_prediction(x_t, t)
            corr_res = torch.einsum("k,bk...->b...", rhos_c[:-1], d1s_t) if d1s_t is not None else 0
            x_t = x_t_ - _expand(alpha_t * b_h, dims) * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
        return x_t, model_t


def sample_unipc(model: Model, x: Tensor, steps: int, *, schedule: DiscreteSchedule,
                 t_start: Tensor | float | None = None, extra_args: ExtraArgs = None,
                 callback: Callback = None, noise_sampler: OptionalNoise = None, order: int = 3,
                 variant: str = "bh1", skip_type: str = "time_uniform",
                 lower_order_final: bool = True, prediction: Prediction = "eps") -> Tensor:
    """UniPC on the VP latent `x` from t_start (default T = 1) to t = 1/N in `steps` steps; returns VP x.

    `order` is capped at `steps` (A1111 asserts instead). `prediction`: what the UNet behind `model` predicts.
    """
    ns = NoiseScheduleVP(schedule.alphas_cumprod)
    solver = _UniPC(model, schedule, ns, extra_args or {}, variant, prediction)
    order = min(order, steps)
    t_0 = 1.0 / ns.total_n
    t_T = ns.T if t_start is None else t_start
    ts = time_steps(ns, skip_type, t_T, t_0, steps).to(x.device)
    index = 0

    def after_update(x_new: Tensor, model_x: Tensor | None) -> None:
        nonlocal index
        if callback is not None:
            callback({"x": x_new, "i": index, "sigma": vec_t[0], "sigma_hat": vec_t[0], "denoised": model_x})
        index += 1

    vec_t = ts[0].expand(x.shape[0])
    model_prev = [solver.data_prediction(x, vec_t)]
    t_prev = [vec_t]
    for init_order in range(1, order):
        vec_t = ts[init_order].expand(x.shape[0])
        x, model_x = solver.update(x, model_prev, t_prev, vec_t, init_order, use_corrector=True)
        if model_x is None:
            model_x = solver.data_prediction(x, vec_t)
        after_update(x, model_x)
        model_prev.append(model_x)
        t_prev.append(vec_t)
    for step in range(order, steps + 1):
        vec_t = ts[step].expand(x.shape[0])
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = solver.update(x, model_prev, t_prev, vec_t, step_order, use_corrector=step != steps)
        after_update(x, model_x)
        for i in range(order - 1):
            t_prev[i] = t_prev[i + 1]
            model_prev[i] = model_prev[i + 1]
        t_prev[-1] = vec_t
        if step < steps:
            if model_x is None:
                model_x = solver.data_prediction(x, vec_t)
            model_prev[-1] = model_x
    return x
