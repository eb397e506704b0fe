"""Pathwise sensitivities dX_t/dtheta (and dX_t/dx0) of SDE solutions, by every standard method, on the same noise.

The schemes' one-step maps and the primal solver `sdekit.simulate` live in `sdekit.solvers`; every method here
differentiates exactly those maps, for every registered scheme and noise type (diagonal, scalar, additive, general),
on increasing and decreasing (reverse-time) grids.

forward        the sensitivity equation integrated alongside the path (forward mode, `forward`); wrt theta and/or x0
backprop       reverse-mode autograd through the same discrete solver (memory grows with N)
adjoint        memory-lean gradients: the reversible adjoint (reversible_heun: the path rebuilt backwards with the
               exact inverse step, gradient = backprop's to round-off, memory independent of N), checkpointed
               backprop for the other schemes, and torchsde's adjoint SDE for comparison (backend="torchsde")
(diffrax)      JAX autodiff through `diffeqsolve` on the same increments: `sdekit.interop.diffrax.path_gradients`
finite_diff    central differences, with and without common random numbers
score_function likelihood-ratio (Girsanov) estimator of the Euler chain, for drift parameters, every noise type
problems       registry of test problems, with closed forms of the discrete scheme or of the continuous limit
compare        runs every method on one problem (`sdekit sensitivity`, sdekit.commands.sensitivity, prints and plots it)
"""
from ..solvers import SCHEMES, brownian_increments
from . import adjoint, backprop, finite_diff, score_function
from .forward import forward

__all__ = ["forward", "backprop", "adjoint", "finite_diff", "score_function", "SCHEMES", "brownian_increments"]
