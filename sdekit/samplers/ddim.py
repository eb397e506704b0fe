"""DDIM (Song, Meng & Ermon 2021, eq. 12), written for any (alpha_t, sigma_t) schedule.

With eps = -sigma_t score and the data prediction x0 = (x_t + sigma_t^2 score) / alpha_t, a step
t -> s < t is
    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,    c = eta sigma_s sqrt(1 - e^{lambda_t - lambda_s}),
where lambda = log(alpha^2 / sigma^2). c with eta = 1 is the std of q(x_s | x_t, x0) (ancestral
sampling, DDPM); eta = 0 is deterministic and equals first-order DPM-Solver, an exponential
integrator of the probability-flow ODE (order 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..precond import data_prediction
from ..sde import SDE
from .noise import check_noise, step_noise

__all__ = ["ddim"]


def ddim(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, generator: torch.Generator | None = None,
         noise: Tensor | None = None, callback: Callable | None = None, eta: float = 0.0) -> Tensor:
    """DDIM from ts[0] to ts[-1]. x: (B, *S); ts: (N+1,) decreasing; noise: (N, B, *S), used when eta > 0.

    eta in [0, 1]: 0 deterministic, 1 ancestral. One NFE per step.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim: eta must be in [0, 1], got {eta!r}")
    check_noise(noise, len(ts) - 1, x, "ddim")
    alphas, sigmas = sde.marginal(ts)
    lams = sde.log_snr(ts)
    for i in range(len(ts) - 1):
        tb = ts[i].expand(x.shape[0])
        score = score_fn(x, tb)
        eps = -sigmas[i] * score
        x0 = data_prediction(score, x, alphas[i], sigmas[i])
        c = eta * sigmas[i + 1] * torch.sqrt(-torch.expm1(lams[i] - lams[i + 1]))
        x = alphas[i + 1] * x0 + torch.sqrt(sigmas[i + 1] ** 2 - c**2) * eps
        if eta > 0:
            x = x + c * step_noise(noise, i, x, generator)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x
