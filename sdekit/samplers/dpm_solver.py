"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): multistep exponential integrators of the probability-flow ODE in the data prediction
D = (x + sigma^2 score) / alpha, second order (Algorithm 2, 2M) and third order (3M).

With lambda = log(alpha / sigma) (half the log-SNR), h = lambda_t - lambda_s0 for the step s0 -> t and
earlier points s1, s2 with h_0 = lambda_s0 - lambda_s1, h_1 = lambda_s1 - lambda_s2, r0 = h_0 / h, r1 = h_1 / h:
    order 1 (DDIM):  x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) D0
    2M:              D0 replaced by D0 + (D0 - D1) / (2 r0)
    3M:              x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1) / h + 1) Dd1
                           - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) Dd2,
                     Dd1 = d0 + r0 / (r0 + r1) (d0 - d1), Dd2 = 2 (d0 - d1) / (r0 + r1),
                     d0 = (D0 - D1) / r0, d1 = (D1 - D2) / r1,
which is the paper's Taylor expansion x_t = (sigma_t / sigma_s0) x_s0 + alpha_t sum_n h^{n+1} phi_{n+1}(h) D^{(n)}
(D^{(n)} = d^n D / d lambda^n at s0) with Dd1 ~ h D' and Dd2 ~ h^2 D'' from divided differences on the uneven
lambda grid. (The reference code and the libraries that copy it use Dd2 = (d0 - d1) / (r0 + r1) ~ h^2 D'' / 2 with
the same weight: a local error O(h^3), so their "3M" converges at order 2; with the factor 2 it is order 3.)
Multistep: one NFE per step, reusing the data predictions of the previous points. The first steps warm up at
lower order; with lower_order_final, grids of fewer than 15 steps end with a first-order step (the one before
at most second order); a step into sigma = 0 is first order, landing on the data prediction.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..precond import data_prediction
from ..sde import SDE
from .schedule import exp_schedule, multistep_orders

__all__ = ["dpmpp_2m", "dpmpp_3m", "dpm_solver_pp"]


def dpm_solver_pp(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, order: int, callback: Callable | None = None,
                  lower_order_final: bool = True) -> Tensor:
    """Multistep DPM-Solver++ of the given order (1, 2 or 3) from ts[0] to ts[-1]. x: (B, *S); ts: (N+1,) decreasing
    (log-SNR grid recommended; may end at t = 0, sigma = 0). Coefficients in float64 whatever x's dtype."""
    alphas, sigmas, lams = exp_schedule(sde, ts)
    n = len(ts) - 1
    orders = multistep_orders(n, order, lower_order_final, bool(sigmas[-1] == 0))
    ds: list[Tensor] = []                                  # data predictions at ts[i], ts[i-1], ... (newest last)
    for i in range(n):
        tb = ts[i].expand(x.shape[0])
        ds.append(data_prediction(score_fn(x, tb), x, alphas[i], sigmas[i]))
        ds = ds[-3:]
        p = orders[i]
        h = lams[i + 1] - lams[i]
        phi1 = torch.expm1(-h)                             # e^{-h} - 1, -1 into sigma = 0
        x_lin = (sigmas[i + 1] / sigmas[i]) * x
        if p == 1:
            x = x_lin - (alphas[i + 1] * phi1) * ds[-1]
        elif p == 2:
            r0 = (lams[i] - lams[i - 1]) / h
            x = x_lin - (alphas[i + 1] * phi1) * (ds[-1] + (ds[-1] - ds[-2]) / (2 * r0))
        else:
            r0 = (lams[i] - lams[i - 1]) / h
            r1 = (lams[i - 1] - lams[i - 2]) / h
            d0 = (ds[-1] - ds[-2]) / r0
            d1 = (ds[-2] - ds[-3]) / r1
            dd1 = d0 + (r0 / (r0 + r1)) * (d0 - d1)
            dd2 = 2 * (d0 - d1) / (r0 + r1)
            x = (x_lin - (alphas[i + 1] * phi1) * ds[-1] + (alphas[i + 1] * (phi1 / h + 1)) * dd1
                 - (alphas[i + 1] * ((phi1 + h) / h**2 - 0.5)) * dd2)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


def dpmpp_2m(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None,
             lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from ts[0] to ts[-1]. x: (B, *S); ts: (N+1,) decreasing.
    One NFE per step; order 2."""
    return dpm_solver_pp(score_fn, sde, x, ts, order=2, callback=callback, lower_order_final=lower_order_final)


def dpmpp_3m(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None,
             lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(3M), third-order multistep, from ts[0] to ts[-1]. x: (B, *S); ts: (N+1,) decreasing.
    One NFE per step; order 3."""
    return dpm_solver_pp(score_fn, sde, x, ts, order=3, callback=callback, lower_order_final=lower_order_final)
