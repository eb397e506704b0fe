"""`rk45`: the adaptive Dormand-Prince 5(4) integrator (`sdekit.solvers.dopri5`) on the probability-flow ODE."""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..sde import SDE
from ..solvers.dopri import check_tolerances, dopri5
from .ode import pf_ode_velocity

__all__ = ["rk45"]


def rk45(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, callback: Callable | None = None,
         info: dict | None = None, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 100_000) -> Tensor:
    """Adaptive Dormand-Prince 5(4) on the probability-flow ODE from ts[0] to ts[-1].

    x: (B, *S). The grid only fixes the points the solver must land on (sample() passes just
    [t_max, t_min]); step sizes are chosen by rtol/atol. info gets 'accepted'/'rejected' step counts.
    NFE: 6 per step attempt plus 2 at the start.
    """
    check_tolerances(rtol, atol, "rk45")
    velocity = lambda t, y: pf_ode_velocity(score_fn, sde, y, t)
    return dopri5(velocity, x, ts, rtol=rtol, atol=atol, max_steps=max_steps, info=info, callback=callback)
