"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep exponential integrator
of the probability-flow ODE in the data prediction D = (x + sigma^2 score) / alpha.

With lambda = log(alpha / sigma) (half the log-SNR) and h_i = lambda_{t_i} - lambda_{t_{i-1}}:
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
    D_i = (1 + 1/(2 r_i)) D(t_{i-1}) - 1/(2 r_i) D(t_{i-2}),  r_i = h_{i-1} / h_i,
and the first step uses D_1 = D(t_0) (first order). One NFE per step; order 2.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..precond import data_prediction
from ..sde import SDE

__all__ = ["dpmpp_2m"]


def dpmpp_2m(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None) -> Tensor:
    """DPM-Solver++(2M) from ts[0] to ts[-1]. x: (B, *S); ts: (N+1,) decreasing (log-SNR grid recommended)."""
    alphas, sigmas = sde.marginal(ts)
    lams = 0.5 * sde.log_snr(ts)
    d_prev = h_prev = None
    for i in range(len(ts) - 1):
        tb = ts[i].expand(x.shape[0])
        d = data_prediction(score_fn(x, tb), x, alphas[i], sigmas[i])
        h = lams[i + 1] - lams[i]
        if d_prev is None:
            d_eff = d
        else:
            r = h_prev / h
            d_eff = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * torch.expm1(-h) * d_eff
        d_prev, h_prev = d, h
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x
