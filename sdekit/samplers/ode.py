"""Fixed-step probability-flow ODE samplers: dx/dt = f(x,t) - g(t)^2 score(x,t) / 2, integrated t_max -> t_min.

Explicit Runge-Kutta methods in t: Euler (order 1), Heun (2), classical RK4 (4).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..sde import SDE

__all__ = ["ode_euler", "heun", "rk4", "pf_ode_velocity"]


def pf_ode_velocity(score_fn: Callable, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """dx/dt of the probability-flow ODE at scalar time t. x: (B, *S)."""
    tb = t.expand(x.shape[0])
    return sde.reverse_drift(x, tb, score_fn(x, tb), probability_flow=True)


def ode_euler(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None) -> Tensor:
    """Explicit Euler on the probability-flow ODE (order 1, one NFE per step). x: (B, *S); ts: (N+1,)."""
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * pf_ode_velocity(score_fn, sde, x, ts[i])
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


def heun(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None) -> Tensor:
    """Heun's method (explicit trapezoid) on the probability-flow ODE (order 2, two NFE per step)."""
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        k1 = pf_ode_velocity(score_fn, sde, x, ts[i])
        k2 = pf_ode_velocity(score_fn, sde, x + h * k1, ts[i + 1])
        x = x + 0.5 * h * (k1 + k2)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


def rk4(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None) -> Tensor:
    """Classical fourth-order Runge-Kutta on the probability-flow ODE (order 4, four NFE per step)."""
    for i in range(len(ts) - 1):
        t, h = ts[i], ts[i + 1] - ts[i]
        k1 = pf_ode_velocity(score_fn, sde, x, t)
        k2 = pf_ode_velocity(score_fn, sde, x + 0.5 * h * k1, t + 0.5 * h)
        k3 = pf_ode_velocity(score_fn, sde, x + 0.5 * h * k2, t + 0.5 * h)
        k4 = pf_ode_velocity(score_fn, sde, x + h * k3, ts[i + 1])
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x
