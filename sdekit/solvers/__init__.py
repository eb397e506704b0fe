"""The bottom layer: SDE and ODE solvers on a time grid. It imports nothing from sdekit outside it.

schemes     the one-step maps of the SDE schemes, their registry SCHEMES and the input checks
simulation  `simulate`, the one primal SDE solver (traced step, eager under autograd, or torch.compile)
brownian    Brownian increments on a grid, and the chunked draws `simulate` makes when none are given
dopri       adaptive Dormand-Prince 5(4) for ODEs dy/dt = f(t, y) on batched tensors
_tracing    traces a step once into straight-line aten code (a detail of `simulate` and `sensitivity.forward`)
"""
from .brownian import brownian_increments, chunk_steps, normal_chunks
from .dopri import dopri5
from .schemes import (SCHEMES, STRONG_ORDER, Field, Scheme, check_diagonal_noise, check_inputs, euler_step,
                      get_scheme, heun_step, milstein_step, step_map)
from .simulation import per_step, simulate

__all__ = ["simulate", "SCHEMES", "Scheme", "STRONG_ORDER", "Field", "get_scheme", "step_map", "euler_step", "milstein_step",
           "heun_step", "check_inputs", "check_diagonal_noise", "brownian_increments", "normal_chunks", "chunk_steps",
           "per_step", "dopri5"]
