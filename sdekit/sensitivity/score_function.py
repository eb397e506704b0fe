"""Score-function (likelihood-ratio) estimator for drift parameters, via Girsanov on the Euler chain
(the registry's "euler" step, `sdekit.solvers`), for every noise type.

Under Euler-Maruyama, X_{n+1} | X_n ~ N(X_n + f h, |h| S) with S = g g^T, so the path's log-density has
theta-derivative

    score = sum_n sign(h_n) (df/dtheta)(t_n, X_n)^T S^{-1} g dW_n

(the residual X_{n+1} - X_n - f h = g dW meets the drift's derivative times h, over the variance |h| S; on a
decreasing grid h < 0 flips the sign). Diagonal noise: S^{-1} g dW = dW / g; scalar, additive and general noise: S
(B, d, d) is factorised (Cholesky) and solved for g dW each step. This is the discrete Girsanov score, and
dE[L(X_N)]/dtheta = E[L(X_N) score] exactly for the Euler chain: no derivative of L and none through the path.

It exists only where the transition has a density: S = g g^T must be invertible (m >= d with g of rank d; scalar
noise only in d = 1), else ValueError naming the step and the path; and only for parameters that leave g unchanged
(else the path measures are mutually singular); those columns come back as NaN. Which parameters leave g unchanged is
never taken from one point: either the caller states them (`drift_params=`, then checked at every step of every path,
ValueError where g moves with one of them), or a parameter counts as drift-only only if dg/dtheta_p is exactly zero at
every (t_n, X_n) where a transition density is used, over all paths (a g = theta_1 x + c started at x = 0 has
dg/dtheta_1 = 0 there, but not along the path). Its variance is typically far above the pathwise estimators' (see
`compare`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..solvers import Field, get_scheme
from ._common import increments

__all__ = ["path_gradients", "drift_only_parameters"]


def drift_only_parameters(g: Field, x: Tensor, theta: Tensor, ts: Tensor) -> Tensor:
    """Boolean (P,): True where dg/dtheta_p is exactly zero at every point given: x (B, d) at ts[0], or a path
    x (N+1, B, d) on ts, checked at the N points (t_n, x_n) whose transitions the Euler chain uses. Evidence on those
    points, not a proof about g elsewhere (`path_gradients(drift_params=...)` states it instead)."""
    path = x if x.ndim == 3 else x[None]
    nonzero = torch.zeros(theta.shape[0], dtype=torch.bool, device=theta.device)
    for n in range(max(path.shape[0] - 1, 1)):
        nonzero |= _g_moves(g, ts[n], path[n], theta)
    return ~nonzero


def _theta_jvps(fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """d fn / d theta_p for every p: (P, *out), one JVP per parameter (vmapped)."""
    dirs = torch.eye(theta.shape[0], dtype=theta.dtype, device=theta.device)
    return torch.func.vmap(lambda v: torch.func.jvp(fn, (theta,), (v,))[1])(dirs)


def _g_moves(g: Field, t: Tensor, x: Tensor, theta: Tensor) -> Tensor:
    """Boolean (P,): dg/dtheta_p is nonzero somewhere on the batch x (B, d) at t."""
    jg = _theta_jvps(lambda th: g(t, x, th), theta.detach())
    return (jg.reshape(theta.shape[0], -1) != 0).any(1)


def _whitened(gx: Tensor, dw: Tensor, noise: str, n: int) -> Tensor:
    """S^{-1} g dW (B, d) with S = g g^T; ValueError where S is singular."""
    if noise == "diagonal":
        bad = gx == 0
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"g is zero at step {n} (path {b}, component {i}): the Euler transition has no density "
                             "there, so the score-function estimator does not exist (use a pathwise method)")
        return dw / gx
    S = gx @ gx.transpose(-1, -2)                                     # (B, d, d)
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info > 0).any()):
        b = int((info > 0).nonzero()[0])
        d, m = gx.shape[-2:]
        why = (f"scalar noise in d = {d} > 1 moves X along one direction only" if noise == "scalar" and d > 1 else
               f"m = {m} < d = {d}" if m < d else "g has rank < d there")
        raise ValueError(f"g g^T is singular at step {n} (path {b}): {why}, so the Euler transition has no density "
                         f"in R^{d} and the score-function estimator does not exist; it needs g g^T invertible "
                         "(m >= d, g of rank d). Use a pathwise method (forward, backprop, adjoint) instead")
    return torch.cholesky_solve((gx @ dw.unsqueeze(-1)), L).squeeze(-1)


def path_gradients(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None,
                   loss: Callable[[Tensor], Tensor], baseline: bool = False, *, noise: str = "diagonal", bm=None,
                   scheme: str = "euler", drift_params: Sequence[int] | None = None) -> Tensor:
    """Per-path estimates L(X_N) score: (B, P), on the Euler chain driven by dW (or bm); NaN for non-drift parameters.

    f, g, x0 (B, d), theta (P,), ts (N+1,) (decreasing for reverse time), dW (N, B, m), noise: as `sdekit.simulate`.
    loss: (B, d) -> (B,). baseline=True subtracts the batch mean of L first (a control variate; unbiased up to
    O(1/B)). scheme must be "euler": the estimator is the score of the Euler chain's Gaussian transitions.
    drift_params: the indices of the parameters that enter f only (the other columns are NaN); each is checked at
    every step of every path, ValueError where g changes with it. None: a parameter counts as drift-only where
    dg/dtheta_p is exactly zero at every step of every path, NaN otherwise.
    """
    if scheme != "euler":
        raise ValueError(f"the score-function estimator differentiates the Euler chain's Gaussian transition density; "
                         f"scheme {scheme!r} has no such density (use scheme='euler', or a pathwise method)")
    dW, _ = increments(f, g, x0, theta, ts, dW, "euler", noise=noise, bm=bm)
    euler = get_scheme("euler").step
    P = theta.shape[0]
    declared = None
    if drift_params is not None:
        declared = torch.zeros(P, dtype=torch.bool)
        for p in drift_params:
            if isinstance(p, bool) or int(p) != p or not 0 <= int(p) < P:
                raise ValueError(f"drift_params must hold indices into theta (0..{P - 1}), got {list(drift_params)}")
            declared[int(p)] = True
    h = ts[1:] - ts[:-1]
    x, score = x0.detach(), x0.new_zeros(x0.shape[0], P)
    theta = theta.detach()
    g_moves = torch.zeros(P, dtype=torch.bool)
    with torch.no_grad():
        for n in range(h.shape[0]):
            t = ts[n]
            dfdth = _theta_jvps(lambda th, t=t, x=x: f(t, x, th), theta)                           # (P, B, d)
            moves = _g_moves(g, t, x, theta).cpu()                 # every point whose transition density is used
            if declared is not None and bool((moves & declared).any()):
                p = int((moves & declared).nonzero()[0])
                raise ValueError(f"drift_params names theta[{p}], but g changes with theta[{p}] at step {n} (t = "
                                 f"{float(t):g}): the Euler chains for different theta[{p}] have mutually singular "
                                 "path measures, so no likelihood ratio (score) exists for it; leave it out of "
                                 "drift_params (its column is NaN) or use a pathwise method")
            g_moves |= moves
            v = _whitened(g(t, x, theta), dW[n], noise, n)
            score = score + torch.sign(h[n]) * torch.einsum("pbd,bd->bp", dfdth, v)
            x = euler(f, g, t, h[n], x, theta, dW[n], noise=noise)
        L = loss(x)
    if baseline:
        L = L - L.mean()
    est = L[:, None] * score
    est[:, (~declared if declared is not None else g_moves).to(est.device)] = float("nan")
    return est
