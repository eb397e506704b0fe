"""Reverse mode: autograd through the same discrete solver (`sdekit.simulate`, which runs the scheme's step map
eagerly when theta or x0 requires grad), the reference the other methods must match to round-off. It tapes every
step, so memory grows with N (for memory independent of N see `sensitivity.adjoint`).

Every function takes the noise as `simulate` does (dW with levy_area for srk, or a Brownian path bm=), any
registered scheme and noise type, and wrt="theta" | "x0" | "both" (see `sensitivity.forward`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..solvers import Field, simulate
from ._common import check_wrt, increments

__all__ = ["jacobian", "path_gradients", "mean_gradient"]


def jacobian(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None = None, scheme: str = "euler",
             save: str = "path", *, noise: str = "diagonal", levy_area: Tensor | None = None, bm=None,
             wrt: str = "theta", dg: Field | None = None):
    """dX/dtheta (and/or dX/dx0 per path) by reverse mode, one vector-Jacobian product per output entry (vectorised).

    Returns (N+1, B, d, P) with save="path", (B, d, P) with save="end"; wrt="x0": (..., B, d, d) with
    J[b, i, k] = dX^b_i/dx0^b_k; wrt="both": the pair. Meant for checks on small B, d, N.
    """
    check_wrt(wrt)
    dW, H = increments(f, g, x0, theta, ts, dW, scheme, noise=noise, levy_area=levy_area, bm=bm, save=save)
    B, d = x0.shape

    def solve(x, th):
        return simulate(f, g, x, th, ts, dW, scheme, save=save, noise=noise, levy_area=H, dg=dg)

    out = []
    if wrt in ("theta", "both"):
        out.append(torch.autograd.functional.jacobian(lambda th: solve(x0, th), theta, vectorize=True))
    if wrt in ("x0", "both"):
        full = torch.autograd.functional.jacobian(lambda x: solve(x, theta), x0, vectorize=True)   # (..., B, d, B, d)
        idx = torch.arange(B)
        out.append(full[..., idx, :, idx, :].movedim(0, -3))                                       # the per-path blocks
    return tuple(out) if wrt == "both" else out[0]


def path_gradients(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None,
                   loss: Callable[[Tensor], Tensor], scheme: str = "euler", *, noise: str = "diagonal",
                   levy_area: Tensor | None = None, bm=None, wrt: str = "theta", dg: Field | None = None,
                   chunk_size: int | None = None):
    """Per-path gradients d L(X_T^b)/dtheta: (B, P) (wrt="x0": d L(X_T^b)/dx0^b (B, d); "both": the pair), by
    torch.func.grad vmapped over the paths. loss: (B, d) -> (B,). chunk_size: paths per vmapped chunk (bounds the
    memory of the tape, which holds chunk_size x N steps; None: all paths at once)."""
    check_wrt(wrt)
    dW, H = increments(f, g, x0, theta, ts, dW, scheme, noise=noise, levy_area=levy_area, bm=bm)  # before vmap hides values
    argnums = {"theta": 0, "x0": 1, "both": (0, 1)}[wrt]
    if H is None:
        def one_path(th, x0_b, dW_b):
            return loss(simulate(f, g, x0_b[None], th, ts, dW_b[:, None], scheme, noise=noise, dg=dg)).sum()
        return torch.func.vmap(torch.func.grad(one_path, argnums=argnums), in_dims=(None, 0, 1),
                               chunk_size=chunk_size)(theta, x0, dW)

    def one_path_levy(th, x0_b, dW_b, H_b):
        return loss(simulate(f, g, x0_b[None], th, ts, dW_b[:, None], scheme, noise=noise, levy_area=H_b[:, None])).sum()
    return torch.func.vmap(torch.func.grad(one_path_levy, argnums=argnums), in_dims=(None, 0, 1, 1),
                           chunk_size=chunk_size)(theta, x0, dW, H)


def mean_gradient(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None,
                  loss: Callable[[Tensor], Tensor], scheme: str = "euler", *, noise: str = "diagonal",
                  levy_area: Tensor | None = None, bm=None, wrt: str = "theta", dg: Field | None = None):
    """d/dtheta of mean_b L(X_T^b) by one ordinary backward pass: (P,) (wrt="x0": (B, d); "both": the pair)."""
    check_wrt(wrt)
    dW, H = increments(f, g, x0, theta, ts, dW, scheme, noise=noise, levy_area=levy_area, bm=bm)
    th = theta.detach().requires_grad_(wrt != "x0")
    x = x0.detach().requires_grad_(wrt != "theta")
    inputs = {"theta": (th,), "x0": (x,), "both": (th, x)}[wrt]
    out = loss(simulate(f, g, x, th, ts, dW, scheme, noise=noise, levy_area=H, dg=dg)).mean()
    grads = torch.autograd.grad(out, inputs)
    return grads if wrt == "both" else grads[0]
