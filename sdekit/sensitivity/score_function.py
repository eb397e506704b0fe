"""Score-function (likelihood-ratio) estimator for drift parameters, via Girsanov on the Euler chain
(the registry's "euler" step, `sdekit.solvers`).

Under Euler-Maruyama, X_{n+1} | X_n ~ N(X_n + f h, g^2 |h|) componentwise, so the path's log-density
has theta-derivative  S = sum_n sign(h_n) sum_i (df_i/dtheta)(t_n, X_n) dW_{n,i} / g_i(t_n, X_n)
(the residual dW = X_{n+1} - X_n - f h meets the drift's derivative times h, over the variance g^2 |h|;
on a decreasing grid h < 0 flips the sign)
(the discrete Girsanov score), and dE[L(X_N)]/dtheta = E[L(X_N) S] exactly for the Euler chain:
no derivative of L and none through the path. It only exists for parameters that leave g unchanged
(else the path measures are mutually singular); those columns come back as NaN. Its variance is
typically far above the pathwise estimators' (see `compare`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..solvers import Field, check_inputs, get_scheme

__all__ = ["path_gradients", "drift_only_parameters"]


def drift_only_parameters(g: Field, x0: Tensor, theta: Tensor, ts: Tensor) -> Tensor:
    """Boolean (P,): True where dg/dtheta_p vanishes at (ts[0], x0) (a necessary check, not a proof)."""
    dirs = torch.eye(theta.shape[0], dtype=theta.dtype)
    jg = torch.func.vmap(lambda v: torch.func.jvp(lambda th: g(ts[0], x0, th), (theta,), (v,))[1])(dirs)
    return (jg.reshape(theta.shape[0], -1) == 0).all(1)


def path_gradients(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor,
                   loss: Callable[[Tensor], Tensor], baseline: bool = False) -> Tensor:
    """Per-path estimates L(X_N) S: (B, P), on the Euler chain driven by dW; NaN for non-drift parameters.

    baseline=True subtracts the batch mean of L first (a control variate; still unbiased up to O(1/B)).
    """
    check_inputs(f, g, x0, theta, ts, dW, "euler")
    euler = get_scheme("euler").step
    P = theta.shape[0]
    drift_only = drift_only_parameters(g, x0, theta, ts)
    dirs = torch.eye(P, dtype=theta.dtype)
    h = ts[1:] - ts[:-1]
    x, score = x0.detach(), x0.new_zeros(x0.shape[0], P)
    theta = theta.detach()
    for n in range(h.shape[0]):
        t = ts[n]
        dfdth = torch.func.vmap(lambda v: torch.func.jvp(lambda th: f(t, x, th), (theta,), (v,))[1])(dirs)  # (P, B, d)
        score = score + torch.sign(h[n]) * (dfdth * (dW[n] / g(t, x, theta))).sum(-1).T
        x = euler(f, g, t, h[n], x, theta, dW[n])
    L = loss(x)
    if baseline:
        L = L - L.mean()
    est = L[:, None] * score
    est[:, ~drift_only] = float("nan")
    return est
