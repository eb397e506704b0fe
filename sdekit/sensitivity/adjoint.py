"""torchsde's stochastic adjoint (`sdeint_adjoint`) on the same Brownian increments.

The increments dW over ts become a piecewise-linear Brownian path W(t) (exact at the grid points,
which is all a fixed-step solve on ts queries). The adjoint solves a backward SDE with its own
discretisation, so its gradient matches backprop only up to discretisation error: O(h^{1/2}) for
Euler on multiplicative noise (stated tolerances in tests/test_sensitivity_methods.py).
Ito, diagonal noise, increasing ts only.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..solvers import Field, check_inputs

__all__ = ["mean_gradient"]


class _SDE(nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, f: Field, g: Field, theta: Tensor):
        super().__init__()
        self.f_, self.g_ = f, g
        self.theta = nn.Parameter(theta.detach().clone())

    def f(self, t, y):
        return self.f_(t, y, self.theta)

    def g(self, t, y):
        return self.g_(t, y, self.theta)


def mean_gradient(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor,
                  loss: Callable[[Tensor], Tensor], method: str = "euler", adjoint_method: str = "euler") -> Tensor:
    """d/dtheta of mean_b L(X_T^b) by torchsde.sdeint_adjoint with fixed steps on ts: (P,)."""
    from ..interop.torchsde import GridBrownian, torchsde  # the adapter imports torchsde or names the [torchsde] extra
    check_inputs(f, g, x0, theta, ts, dW, "euler")
    if not (ts[1:] > ts[:-1]).all():
        raise ValueError("the torchsde adjoint needs increasing ts")
    sde = _SDE(f, g, theta)
    bm = GridBrownian(ts.contiguous(), dW)
    dt = float((ts[1:] - ts[:-1]).min())
    ys = torchsde.sdeint_adjoint(sde, x0.detach(), ts[[0, -1]], bm=bm, dt=dt, method=method,
                                 adjoint_method=adjoint_method)
    loss(ys[-1]).mean().backward()
    return sde.theta.grad.detach()
