"""Central finite differences in theta, with or without common random numbers (CRN).

With CRN both perturbed solves use the same dW, so (X(theta+h) - X(theta-h)) / 2h converges to the
pathwise derivative of the discrete scheme as h -> 0 (error O(h^2) until round-off, O(eps/h)).
Without CRN the two solves use independent noise: the difference no longer shrinks with h, so the
per-path variance grows like Var(L) / (2 h^2).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..solvers import Field, brownian_increments, simulate

__all__ = ["jacobian", "path_gradients"]


def _shifted(theta: Tensor, p: int, delta: float) -> Tensor:
    th = theta.detach().clone()
    th[p] += delta
    return th


def jacobian(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, h: float,
             scheme: str = "euler") -> Tensor:
    """(X_T(theta + h e_p) - X_T(theta - h e_p)) / 2h on common noise dW: (B, d, P)."""
    cols = [(simulate(f, g, x0, _shifted(theta, p, h), ts, dW, scheme)
             - simulate(f, g, x0, _shifted(theta, p, -h), ts, dW, scheme)) / (2 * h) for p in range(theta.shape[0])]
    return torch.stack(cols, -1)


def path_gradients(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor,
                   loss: Callable[[Tensor], Tensor], h: float, scheme: str = "euler", crn: bool = True,
                   generator: torch.Generator | None = None) -> Tensor:
    """Per-path central differences of L(X_T): (B, P).

    crn=True uses dW for both solves; crn=False draws fresh independent noise (from generator) for
    every perturbed solve, dW is used for neither.
    """
    if h <= 0:
        raise ValueError(f"finite-difference step h must be positive, got {h}")
    cols = []
    for p in range(theta.shape[0]):
        noise_plus = dW if crn else brownian_increments(ts, tuple(x0.shape), generator)
        noise_minus = dW if crn else brownian_increments(ts, tuple(x0.shape), generator)
        plus = loss(simulate(f, g, x0, _shifted(theta, p, h), ts, noise_plus, scheme))
        minus = loss(simulate(f, g, x0, _shifted(theta, p, -h), ts, noise_minus, scheme))
        cols.append((plus - minus) / (2 * h))
    return torch.stack(cols, -1)
