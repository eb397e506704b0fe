"""Pathwise sensitivities dX_t/dtheta of SDE solutions, by every standard method, on the same noise.

The schemes' one-step maps and the primal solver `sdekit.simulate` live in `sdekit.solvers`.

forward        the sensitivity equation integrated alongside the path (forward mode, `forward`)
backprop       reverse-mode autograd through the same discrete solver
adjoint        torchsde's `sdeint_adjoint` on the same Brownian increments (torchsde through `sdekit.interop.torchsde`)
(diffrax)      JAX autodiff through `diffeqsolve` on the same increments: `sdekit.interop.diffrax.path_gradients`
finite_diff    central differences, with and without common random numbers
score_function likelihood-ratio (Girsanov) estimator for drift parameters
problems       registry of test problems with closed forms where they exist
compare        runs every method on one problem (`sdekit sensitivity`, sdekit.commands.sensitivity, prints and plots it)
"""
from ..solvers import SCHEMES, brownian_increments
from .forward import forward

__all__ = ["forward", "SCHEMES", "brownian_increments"]
