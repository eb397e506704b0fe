"""EDM stochastic sampler (Karras et al. 2022, Algorithm 2): Heun's method in sigma with "churn".

Written for any SDE through y = x / alpha_t and sigma = sigma_t / alpha_t (`sde.sigma_ratio`), in
which the probability-flow ODE is dy/dsigma = (y - D(y; sigma)) / sigma with the data prediction
D = (x + sigma_t^2 score(x, t)) / alpha_t. Each step optionally raises the noise level from sigma_i
to sigma_hat = sigma_i (1 + gamma_i) by adding fresh noise, then takes a Heun step to sigma_{i+1}:
    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0
    y_hat = y + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
    d = (y_hat - D(y_hat; sigma_hat)) / sigma_hat;  y' = y_hat + (sigma_{i+1} - sigma_hat) d
    d' = (y' - D(y'; sigma_{i+1})) / sigma_{i+1};   y_{i+1} = y_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2
The default grid ends at t_min > 0, so the Heun correction applies on every step; on a grid ending at
t = 0 (sigma = 0, EDM's own) the last step is an Euler step, as in the paper (one NFE less). sigma_hat is capped at
sigma_ratio(ts[0]) so the
score is never queried above the grid's start. S_churn = 0 gives deterministic Heun (order 2).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..precond import data_prediction
from ..sde import SDE
from .noise import check_noise, step_noise

__all__ = ["edm"]


def edm(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, generator: torch.Generator | None = None,
        noise: Tensor | None = None, callback: Callable | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
        S_tmax: float = float("inf"), S_noise: float = 1.0) -> Tensor:
    """EDM stochastic Heun from ts[0] to ts[-1]. x: (B, *S); ts: (N+1,) decreasing; noise: (N, B, *S),
    row i used when step i churns. Without noise and with S_churn > 0, one draw per step is taken from
    generator whether or not the step churns, so a generator run equals the run given those draws as noise.
    S_tmin/S_tmax bound sigma = sigma_t / alpha_t. Two NFE per step (one for a last step into sigma = 0)."""
    if S_churn < 0 or S_noise < 0 or S_tmin < 0 or S_tmax < S_tmin:
        raise ValueError(f"edm: need S_churn >= 0, S_noise >= 0 and 0 <= S_tmin <= S_tmax, got "
                         f"S_churn={S_churn}, S_noise={S_noise}, S_tmin={S_tmin}, S_tmax={S_tmax}")
    check_noise(noise, len(ts) - 1, x, "edm")
    n = len(ts) - 1
    alphas, _ = sde.marginal(ts)
    sigmas = sde.sigma_ratio(ts)
    sigma_cap = float(sigmas[0])

    def denoise(y: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = sde.marginal(t)
        xt = alpha * y
        return data_prediction(score_fn(xt, t.expand(y.shape[0])), xt, alpha, sigma)

    y = x / alphas[0]
    for i in range(n):
        s_i, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= float(s_i) <= S_tmax else 0.0
        s_hat = min(float(s_i) * (1 + gamma), sigma_cap)
        # with churn on, one draw per step whether or not this step churns: step i uses row i in both paths
        z = step_noise(noise, i, y, generator) if S_churn > 0 else None
        if s_hat > float(s_i):
            t_hat = sde.t_from_sigma_ratio(torch.tensor(s_hat, dtype=torch.float64)).to(ts)
            s_hat = sde.sigma_ratio(t_hat)                          # consistent with t_hat to round-off
            y_hat = y + torch.sqrt(s_hat**2 - s_i**2) * S_noise * z
        else:
            t_hat, s_hat, y_hat = ts[i], s_i, y
        d = (y_hat - denoise(y_hat, t_hat)) / s_hat
        y = y_hat + (s_next - s_hat) * d                                   # Euler step
        if float(s_next) > 0:                                              # 2nd order correction (not into sigma = 0)
            d_next = (y - denoise(y, ts[i + 1])) / s_next
            y = y_hat + (s_next - s_hat) * 0.5 * (d + d_next)
        if callback is not None:
            callback(i, ts[i + 1], alphas[i + 1] * y)
    return alphas[-1] * y
