"""Probability-flow ODE samplers: dx/dt = f(x,t) - g(t)^2 score(x,t) / 2, integrated t_max -> t_min."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..sde import SDE

__all__ = ["ode_euler", "heun", "pf_ode_velocity"]


def pf_ode_velocity(score_fn: Callable, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """dx/dt of the probability-flow ODE at scalar time t. x: (B, *S)."""
    tb = t.expand(x.shape[0])
    return sde.reverse_drift(x, tb, score_fn(x, tb), probability_flow=True)


def ode_euler(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None, **_) -> Tensor:
    """Explicit Euler on the probability-flow ODE (order 1, one NFE per step)."""
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * pf_ode_velocity(score_fn, sde, x, ts[i])
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


def heun(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None, **_) -> Tensor:
    """Heun's method (explicit trapezoid) on the probability-flow ODE (order 2, two NFE per step)."""
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        k1 = pf_ode_velocity(score_fn, sde, x, ts[i])
        k2 = pf_ode_velocity(score_fn, sde, x + h * k1, ts[i + 1])
        x = x + 0.5 * h * (k1 + k2)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x
