"""torchsde's stochastic adjoint (`sdeint_adjoint`) on the same Brownian increments.

The increments dW over ts become a piecewise-linear Brownian path W(t) (exact at the grid points,
which is all a fixed-step solve on ts queries). The adjoint solves a backward SDE with its own
discretisation, so its gradient matches backprop only up to discretisation error: O(h^{1/2}) for
Euler on multiplicative noise (stated tolerances in tests/test_sensitivity_methods.py).
Ito, diagonal noise, increasing ts only.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .schemes import Field, check_inputs

__all__ = ["GridBrownian", "mean_gradient"]


class GridBrownian:
    """W(t) interpolating the cumulative sums of dW (N, B, d) on ts; W(ta, tb) = W(tb) - W(ta)."""

    def __init__(self, ts: Tensor, dW: Tensor):
        import torchsde  # noqa: F401  (the base class lives there)
        self.ts = ts.contiguous()
        self.W = torch.cat([torch.zeros_like(dW[:1]), dW.cumsum(0)])     # (N+1, B, d)

    def _at(self, t) -> Tensor:
        t = torch.as_tensor(t, dtype=self.ts.dtype).clamp(self.ts[0], self.ts[-1])
        i = int(torch.searchsorted(self.ts, t.reshape(1), right=True).clamp(1, len(self.ts) - 1))
        w = (t - self.ts[i - 1]) / (self.ts[i] - self.ts[i - 1])
        return self.W[i - 1] + w * (self.W[i] - self.W[i - 1])

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None:
            return self._at(ta)
        return self._at(tb) - self._at(ta)

    def __repr__(self):
        return f"GridBrownian(steps={len(self.ts) - 1})"

    @property
    def dtype(self):
        return self.W.dtype

    @property
    def device(self):
        return self.W.device

    @property
    def shape(self):
        return self.W.shape[1:]

    @property
    def levy_area_approximation(self):
        return "none"


def _as_torchsde_brownian(ts: Tensor, dW: Tensor):
    import torchsde
    cls = type("SdekitGridBrownian", (GridBrownian, torchsde.BaseBrownian), {})
    return cls(ts, dW)


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
    import torchsde
    check_inputs(f, g, x0, theta, ts, dW, "euler")
    if not (ts[1:] > ts[:-1]).all():
        raise ValueError("the torchsde adjoint needs increasing ts")
    sde = _SDE(f, g, theta)
    bm = _as_torchsde_brownian(ts, dW)
    dt = float((ts[1:] - ts[:-1]).min())
    ys = torchsde.sdeint_adjoint(sde, x0.detach(), ts[[0, -1]], bm=bm, dt=dt, method=method,
                                 adjoint_method=adjoint_method)
    loss(ys[-1]).mean().backward()
    return sde.theta.grad.detach()
