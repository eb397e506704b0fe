"""The bottom layer: SDE and ODE solvers on a time grid. It imports nothing from sdekit outside it.

schemes     the one-step maps of the SDE schemes for every noise type (diagonal, scalar, additive, general), their
            registry SCHEMES (sde_type and strong order per noise type), Ito <-> Stratonovich drifts, the input checks
simulation  `simulate`, the one primal SDE solver: checks, then one driver (the eager loop by default)
problem     what every driver reads: the solve's fields, grid, state and increments (`Solve`); non-finite reports
traced      the opt-in traced loop (`simulate(trace=True)`, a purity contract like jax.jit's)
compiled    `simulate(compile=...)`: BLOCK steps per torch.compile'd call, on dynamo's guards
adjoint     `simulate(adjoint=True)`: backward by the native adjoint, gradients for x0, theta and network weights
brownian    Brownian increments on a grid, and the chunked draws `simulate` makes when none are given
brownian_path  Brownian paths `simulate(bm=...)` reads: BrownianGrid (sums of fine increments), VirtualBrownianTree
            (any time, from a seed), torchsde's BrownianInterval / BrownianTree through their call protocol
adaptive    step doubling on a Brownian path, `simulate(adaptive=True)`
dopri       adaptive Dormand-Prince 5(4) for ODEs dy/dt = f(t, y) on batched tensors
_tracing    traces a step once into straight-line aten code (behind trace=True of `simulate` and the sensitivities)
"""
from .brownian import brownian_increments, chunk_steps, normal_chunks
from .brownian_path import BrownianGrid, BrownianPath, VirtualBrownianTree
from .dopri import dopri5
from .schemes import (
                      NOISE_TYPES,
                      SCHEMES,
                      STRONG_ORDER,
                      Field,
                      Scheme,
                      check_additive_noise,
                      check_diagonal_noise,
                      check_inputs,
                      euler_heun_step,
                      euler_step,
                      g_prod,
                      get_scheme,
                      heun_step,
                      init_state,
                      inverse_map,
                      ito_correction,
                      ito_to_stratonovich,
                      midpoint_step,
                      milstein_step,
                      reversible_heun_step,
                      srk_step,
                      step_map,
                      stratonovich_to_ito,
)
from .simulation import per_step, simulate

__all__ = ["simulate", "SCHEMES", "Scheme", "STRONG_ORDER", "NOISE_TYPES", "Field", "get_scheme", "step_map", "inverse_map",
           "init_state", "g_prod", "euler_step", "milstein_step", "srk_step", "euler_heun_step", "heun_step", "midpoint_step",
           "reversible_heun_step", "ito_correction", "ito_to_stratonovich", "stratonovich_to_ito", "check_inputs",
           "check_diagonal_noise", "check_additive_noise", "brownian_increments", "normal_chunks", "chunk_steps",
           "per_step", "dopri5", "BrownianPath", "BrownianGrid", "VirtualBrownianTree"]
