"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"): the multistep predictor UniP-p and the corrector UniC-p in the data prediction
D = (x + sigma^2 score) / alpha, with lambda = log(alpha / sigma).

For the step s0 -> t with h = lambda_t - lambda_s0 and earlier points s_k (k = 1..p-1) at r_k = (lambda_sk -
lambda_s0) / h < 0, the divided differences are Dd_k = (D_sk - D_s0) / r_k. With hh = -h,
    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{hh} - 1) D_s0 - alpha_t B(h) sum_k rho_k Dd_k,
where B(h) = hh (variant bh1) or e^{hh} - 1 (bh2), and rho solves R rho = b with R_{mk} = r_k^(m-1) and
b_m = m! phi_{m+1}(hh) / B(h), hh phi_{m+1} built by phi_{m+1} = phi_m / hh - 1 / m! from hh phi_1 = e^{hh} - 1
(the order conditions of the paper's Theorem 3.1). With a single difference (UniP-2, UniC-1) the paper takes
rho = 1/2, which meets the condition to the order needed; that is where bh1 and bh2 differ (a solved system
makes B(h) cancel).
UniP-p (predictor) uses the p - 1 earlier points: order p. UniC-p (corrector) adds the point t itself, r = 1,
with D_t evaluated at the predicted x_t, and rewrites x_t: order p + 1 with no extra NFE, since D_t is the
evaluation the next predictor needs anyway (the model is not re-evaluated at the corrected x_t). The last
point is not corrected (that would cost an NFE). One NFE per step.

Warm-up: step i uses at most i + 1 points; with lower_order_final, grids of fewer than 15 steps end with a
first-order step (the one before at most second order); a step into sigma = 0 is first order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..precond import data_prediction
from ..sde import SDE
from .schedule import check_order, exp_schedule, multistep_orders

__all__ = ["unipc", "uni_coefficients"]

VARIANTS = ("bh1", "bh2")


def uni_coefficients(h: Tensor, rks: list[Tensor], variant: str) -> tuple[Tensor, Tensor]:
    """(rho, B(h)) solving R rho = b for the ratios rks = [r_1, ..., r_m] (float64; r = 1 for the corrector's point t)."""
    hh = -h
    hphi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else hphi_1
    m = len(rks)
    hphi_k, fact, b, R = hphi_1 / hh - 1, 1, [], []
    for k in range(1, m + 1):
        R.append(torch.stack([r ** (k - 1) for r in rks]))
        b.append(hphi_k * fact / b_h)
        fact *= k + 1
        hphi_k = hphi_k / hh - 1 / fact
    return torch.linalg.solve(torch.stack(R), torch.stack(b)), b_h


def _uni_step(x_s0: Tensor, ds: list[Tensor], lams: list[Tensor], lam_t: Tensor, alpha_t: Tensor, sigma_t: Tensor,
              sigma_s0: Tensor, p: int, variant: str, d_t: Tensor | None = None) -> Tensor:
    """UniP-p (d_t None) or UniC-p (d_t the data prediction at t) for s0 -> t. ds, lams: points ..., s1, s0 (newest last)."""
    h = lam_t - lams[-1]
    x_t = (sigma_t / sigma_s0) * x_s0 - (alpha_t * torch.expm1(-h)) * ds[-1]
    if p == 1 and d_t is None:
        return x_t                                          # first-order predictor: DDIM
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, p)]
    diffs = [(ds[-1 - k] - ds[-1]) / r for k, r in zip(range(1, p), rks)]
    if d_t is not None:
        rks.append(torch.ones((), dtype=h.dtype))
        diffs.append(d_t - ds[-1])
    rho, b_h = uni_coefficients(h, rks, variant)
    if len(rks) == 1:
        rho = torch.full((1,), 0.5, dtype=h.dtype)          # the paper's a_1 = 1/2 for a single difference
    correction = sum(rho[k] * diffs[k] for k in range(len(diffs)))
    return x_t - (alpha_t * b_h) * correction


def unipc(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None, order: int = 3,
          variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True) -> Tensor:
    """UniPC from ts[0] to ts[-1]: UniP-`order` predictor, UniC corrector (when corrector=True), variant 'bh1' or
    'bh2'. x: (B, *S); ts: (N+1,) decreasing (log-SNR grid recommended; may end at t = 0, sigma = 0).
    One NFE per step; coefficients in float64 whatever x's dtype."""
    check_order(order, (1, 2, 3), "unipc")
    if variant not in VARIANTS:
        raise ValueError(f"unipc: variant must be one of {list(VARIANTS)}, got {variant!r}")
    alphas, sigmas, lams = exp_schedule(sde, ts)
    n = len(ts) - 1
    orders = multistep_orders(n, order, lower_order_final, bool(sigmas[-1] == 0))
    ds: list[Tensor] = []                                   # data predictions at the points so far (newest last)
    x_prev = None                                           # the state the last predictor started from
    for i in range(n):
        tb = ts[i].expand(x.shape[0])
        d = data_prediction(score_fn(x, tb), x, alphas[i], sigmas[i])
        if corrector and i > 0:
            # UniC: rewrite x_i, predicted from x_{i-1}, with D evaluated at it (no extra NFE)
            x = _uni_step(x_prev, ds, list(lams[i - len(ds):i]), lams[i], alphas[i], sigmas[i], sigmas[i - 1],
                          orders[i - 1], variant, d_t=d)
        ds = (ds + [d])[-order:]
        x_prev = x
        # UniP: predict x_{i+1}
        x = _uni_step(x, ds, list(lams[i + 1 - len(ds):i + 1]), lams[i + 1], alphas[i + 1], sigmas[i + 1], sigmas[i],
                      orders[i], variant)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x
