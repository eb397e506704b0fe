"""Reverse mode: autograd through the same discrete solver (`sdekit.simulate`, which runs the scheme's
step map eagerly when theta requires grad), the reference the forward sensitivity must match to
round-off. It tapes every step, so memory grows with N."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..solvers import Field, check_inputs, simulate

__all__ = ["jacobian", "path_gradients", "mean_gradient"]


def jacobian(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, scheme: str = "euler",
             save: str = "path") -> Tensor:
    """dX/dtheta by reverse mode, one vector-Jacobian product per output entry (vectorised).

    Returns (N+1, B, d, P) with save="path", (B, d, P) with save="end". Meant for checks on small B, d, N.
    """
    return torch.autograd.functional.jacobian(lambda th: simulate(f, g, x0, th, ts, dW, scheme, save=save),
                                              theta, vectorize=True)


def path_gradients(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor,
                   loss: Callable[[Tensor], Tensor], scheme: str = "euler") -> Tensor:
    """Per-path gradients d L(X_T^b)/dtheta: (B, P), by torch.func.grad vmapped over the paths."""
    check_inputs(f, g, x0, theta, ts, dW, scheme)         # once on the whole batch, before vmap hides the values
    def one_path(th, x0_b, dW_b):
        return loss(simulate(f, g, x0_b[None], th, ts, dW_b[:, None], scheme)).sum()

    return torch.func.vmap(torch.func.grad(one_path), in_dims=(None, 0, 1))(theta, x0, dW)


def mean_gradient(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor,
                  loss: Callable[[Tensor], Tensor], scheme: str = "euler") -> Tensor:
    """d/dtheta of mean_b L(X_T^b) by one ordinary backward pass: (P,)."""
    th = theta.detach().requires_grad_(True)
    return torch.autograd.grad(loss(simulate(f, g, x0, th, ts, dW, scheme)).mean(), th)[0]
