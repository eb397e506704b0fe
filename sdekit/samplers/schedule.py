"""What the multistep samplers share: the schedule on a grid in float64, and the order of each step.

Coefficients of the exponential integrators (dpm_solver, unipc, deis) are differences and ratios of
log-SNRs that cancel badly in float32 (a float32 DEIS loses accuracy as the number of steps grows), so
they are computed in float64 on the CPU whatever the model's dtype and device, and applied as 0-d
float64 tensors: torch keeps x's dtype when a 0-d tensor of the same kind multiplies it, and the
arithmetic stays differentiable in the grid (what `sdekit.samplers.optimize` needs).

A grid may end at t = 0, where sigma = 0 for every SDE here (the "final sigma zero" of k-diffusion's and
diffusers' grids): the last step then lands on the data prediction, which every sampler built on these
helpers does with a first-order step (a higher-order one would extrapolate in lambda to +inf).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..sde import SDE

__all__ = ["exp_schedule", "multistep_orders", "check_order", "LOWER_ORDER_FINAL_BELOW"]

# diffusers' rule for DPM-Solver: below 15 steps, the last step is first order and the one before it at most
# second order. The final steps of an equal-t grid are long in log-SNR, where extrapolating the data
# prediction costs more than it gains; above 15 steps the lowering would cap the global order at 2.
LOWER_ORDER_FINAL_BELOW = 15


def exp_schedule(sde: SDE, ts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha, sigma, lambda) at ts: (N+1,), float64 on the CPU; lambda = log(alpha / sigma), +inf where sigma = 0."""
    t64 = ts.to(device="cpu", dtype=torch.float64)
    alphas, sigmas = sde.marginal(t64)
    lams = 0.5 * sde.log_snr(t64)
    return alphas, sigmas, lams


def multistep_orders(n_steps: int, order: int, lower_order_final: bool, ends_at_zero: bool) -> list[int]:
    """The order of each of n_steps multistep steps: warm-up (step i uses at most the i+1 points it has),
    lower order at the end below LOWER_ORDER_FINAL_BELOW steps, and first order into sigma = 0."""
    orders = [min(order, i + 1) for i in range(n_steps)]
    if lower_order_final and n_steps < LOWER_ORDER_FINAL_BELOW:
        orders[-1] = 1
        if n_steps >= 2:
            orders[-2] = min(orders[-2], 2)
    if ends_at_zero:
        orders[-1] = 1
    return orders


def check_order(order, allowed: tuple[int, ...], sampler: str) -> int:
    if not isinstance(order, int) or isinstance(order, bool) or order not in allowed:
        raise ValueError(f"{sampler}: order must be one of {list(allowed)}, got {order!r}")
    return order
