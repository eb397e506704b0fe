"""diffrax: JAX autodiff through `diffeqsolve` on the same Brownian increments (JAX imported lazily).

The increments become a `diffrax.LinearInterpolation` of W on ts (exact at the grid points), the
diffusion a diagonal `lineax` operator, and the solver steps exactly on ts (`StepTo`). Solvers:
euler -> diffrax.Euler, milstein -> diffrax.ItoMilstein, heun -> diffrax.Heun (Stratonovich).
Per-path gradients come from jax.vmap(jax.grad(...)) over the paths. Enables float64 in JAX
(jax_enable_x64), a process-wide JAX setting.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["path_gradients"]


def path_gradients(xp_fields: Callable, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor,
                   loss_xp: Callable, scheme: str = "euler") -> Tensor:
    """Per-path d L(X_T^b)/dtheta: (B, P) as a torch tensor.

    xp_fields(xp) -> (f, g) written against the array namespace xp (here jax.numpy), with the shapes
    of `forward`; loss_xp(x: (1, d)) -> (1,) in the same namespace.
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp
    import lineax

    class GridBrownian(diffrax.AbstractBrownianPath):
        """The given increments as a Brownian path (so SDE-only solvers accept it); exact on ts."""
        path: diffrax.LinearInterpolation
        levy_area = diffrax.BrownianIncrement

        @property
        def t0(self):
            return self.path.t0

        @property
        def t1(self):
            return self.path.t1

        def evaluate(self, t0, t1=None, left=True, use_levy=False):
            return self.path.evaluate(t0, t1, left)

    solvers = {"euler": diffrax.Euler, "milstein": diffrax.ItoMilstein, "heun": diffrax.Heun}
    if scheme not in solvers:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {sorted(solvers)}")
    f, g = xp_fields(jnp)
    ts_j = jnp.asarray(ts.detach().cpu().numpy())
    W = np.concatenate([np.zeros_like(dW[:1].cpu().numpy()), dW.detach().cpu().numpy().cumsum(0)])  # (N+1, B, d)
    W_j = jnp.asarray(np.moveaxis(W, 1, 0))                                                        # (B, N+1, d)
    x0_j = jnp.asarray(x0.detach().cpu().numpy())

    def one_path(th, y0, w):
        drift = diffrax.ODETerm(lambda t, y, args: f(t, y[None], th)[0])
        diffusion = diffrax.ControlTerm(lambda t, y, args: lineax.DiagonalLinearOperator(g(t, y[None], th)[0]),
                                        GridBrownian(diffrax.LinearInterpolation(ts=ts_j, ys=w)))
        sol = diffrax.diffeqsolve(diffrax.MultiTerm(drift, diffusion), solvers[scheme](), ts_j[0], ts_j[-1],
                                  dt0=None, y0=y0, stepsize_controller=diffrax.StepTo(ts=ts_j),
                                  saveat=diffrax.SaveAt(t1=True), max_steps=len(ts_j) + 1,
                                  adjoint=diffrax.DirectAdjoint())
        return loss_xp(sol.ys[-1][None])[0]

    grads = jax.jit(jax.vmap(jax.grad(one_path), in_axes=(None, 0, 0)))(jnp.asarray(theta.detach().cpu().numpy()),
                                                                          x0_j, W_j)
    return torch.tensor(np.asarray(grads), dtype=theta.dtype)
