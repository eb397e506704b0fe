"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"): the
probability-flow ODE as an exponential integrator in eps with Adams-Bashforth extrapolation in t (tAB-DEIS, the
paper's default), in rho (rhoAB-DEIS) or in log rho (the variant diffusers' DEISMultistepScheduler implements, and
sdekit's default).

With y = x / alpha and rho = sigma / alpha the ODE is dy / drho = eps(x, t), eps = -sigma score (eq. 10-11 for
VP; the same for every SDE here). A step t_i -> t_{i+1} fits the Lagrange polynomial through the last r + 1
evaluations eps_{i-j} at times t_{i-j} (j = 0..r) and integrates it exactly along rho (eq. 14):
    y_{i+1} = y_i + sum_j C_ij eps_{i-j},   C_ij = int_{rho_i}^{rho_{i+1}} prod_{k != j} (t(rho) - t_{i-k}) / (t_{i-j} - t_{i-k}) drho,
where t(rho) inverts the schedule. The paper computes C_ij numerically, once per grid; here by 16-point
Gauss-Legendre quadrature in log rho (t(rho) is smooth in log rho on [rho_min, rho_max]), in float64. With
basis="rho" or "log_rho" the Lagrange polynomial is in that variable instead of t (same quadrature). r = 0 is
DDIM. Order r + 1 (default 3). One NFE per step.

Warm-up: step i uses at most i + 1 points; with lower_order_final, grids of fewer than 15 steps end with a
first-order step (the one before at most second order); a step into sigma = 0 is first order (DDIM).

Defaults (basis="log_rho", lower_order_final=False) were chosen over a family of random exact mixtures under VP, VE
and EDM at 5-20 NFE (sdekit.samplers.family, the tuning seed TUNING_FAMILY_SEED; reports use other seeds): there the
median error of log-rho extrapolation on the log-SNR grid was 0.75x / 0.37x / 0.52x / 0.65x the best peer's at
5 / 10 / 15 / 20 NFE against 0.98x / 0.96x / 2.3x / 2.5x for tAB ("t"), and keeping full order to the last step
lowered it to 0.58x at 5 NFE and 0.36x at 10 (worst over the family 1.02x and 0.63x, from 1.33x and 0.60x).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..sde import SDE
from .schedule import check_order, exp_schedule, multistep_orders

__all__ = ["deis", "tab_coefficients", "BASES"]

_NODES, _WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(16))
BASES = ("t", "rho", "log_rho")                                      # the variable eps is extrapolated in


def tab_coefficients(sde: SDE, t_nodes: Tensor, rho_from: Tensor, rho_to: Tensor, basis: str = "t") -> Tensor:
    """C_j = int_{rho_from}^{rho_to} l_j(v(rho)) drho for the Lagrange basis l_j over the nodes v(t_nodes), v = t, rho
    or log rho (`basis`): (m,) (float64; rho > 0)."""
    u0, u1 = torch.log(rho_from), torch.log(rho_to)
    u = 0.5 * (u1 - u0) * _NODES + 0.5 * (u1 + u0)                  # Gauss-Legendre nodes in log rho
    rho = torch.exp(u)
    if basis == "t":
        t = sde.t_from_sigma_ratio(rho)
    else:
        t_nodes = sde.sigma_ratio(t_nodes)
        t, t_nodes = (rho, t_nodes) if basis == "rho" else (u, torch.log(t_nodes))
    m = len(t_nodes)
    basis = []
    for j in range(m):
        lj = torch.ones_like(t)
        for k in range(m):
            if k != j:
                lj = lj * (t - t_nodes[k]) / (t_nodes[j] - t_nodes[k])
        basis.append(lj)
    return torch.stack([0.5 * (u1 - u0) * (_WEIGHTS * lj * rho).sum() for lj in basis])


def deis(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None, order: int = 3,
         lower_order_final: bool = False, basis: str = "log_rho") -> Tensor:
    """DEIS of the given order (1..4) from ts[0] to ts[-1], eps extrapolated in `basis` ('log_rho', the default and
    diffusers' choice; 't': tAB-DEIS, the paper's default; 'rho'). x: (B, *S); ts: (N+1,) decreasing (may end at
    t = 0, sigma = 0). One NFE per step; coefficients in float64 whatever x's dtype."""
    check_order(order, (1, 2, 3, 4), "deis")
    if basis not in BASES:
        raise ValueError(f"deis: basis must be one of {list(BASES)}, got {basis!r}")
    alphas, sigmas, _ = exp_schedule(sde, ts)
    t64 = ts.to(device="cpu", dtype=torch.float64)
    rhos = sigmas / alphas
    n = len(ts) - 1
    orders = multistep_orders(n, order, lower_order_final, bool(sigmas[-1] == 0))
    y = x / alphas[0]
    eps: list[Tensor] = []                                            # eps at the points so far (newest last)
    for i in range(n):
        tb = ts[i].expand(x.shape[0])
        xt = alphas[i] * y
        eps = (eps + [-sigmas[i] * score_fn(xt, tb)])[-order:]
        p = orders[i]
        if p == 1:
            y = y + (rhos[i + 1] - rhos[i]) * eps[-1]
        else:
            coef = tab_coefficients(sde, t64[i + 1 - p:i + 1], rhos[i], rhos[i + 1], basis)   # nodes oldest first
            y = y + sum(coef[j] * eps[len(eps) - p + j] for j in range(p))
        if callback is not None:
            callback(i, ts[i + 1], alphas[i + 1] * y)
    return alphas[-1] * y
