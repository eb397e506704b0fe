"""Time grids for samplers: decreasing (N+1,) tensors from sde.t_max to sde.t_min (or on to t = 0, sigma = 0)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..sde import SDE

__all__ = ["uniform_t", "uniform_log_snr", "edm_rho", "GRIDS", "make_grid"]


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def uniform_t(sde: SDE, steps: int, dtype=torch.float32, device=None) -> Tensor:
    """t_max -> t_min in equal steps of t."""
    _check_steps(steps)
    return torch.linspace(sde.t_max, sde.t_min, steps + 1, dtype=dtype, device=device)


def uniform_log_snr(sde: SDE, steps: int, dtype=torch.float32, device=None) -> Tensor:
    """Equal steps of log-SNR lambda(t) (the grid DPM-Solver uses)."""
    _check_steps(steps)
    ends = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64)
    lam = sde.log_snr(ends)
    ts = sde.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), steps + 1, dtype=torch.float64))
    ts[0], ts[-1] = sde.t_max, sde.t_min  # pin the ends against round-off in the inverse
    return ts.to(dtype=dtype, device=device)


def edm_rho(sde: SDE, steps: int, rho: float | None = None, dtype=torch.float32, device=None) -> Tensor:
    """EDM spacing: sigma_i^(1/rho) uniform between sigma_max and sigma_min, mapped back to t.

    sigma here is sigma_t / alpha_t, so the grid is defined for every SDE, not only EDM.
    """
    _check_steps(steps)
    rho = rho if rho is not None else getattr(sde, "rho", 7.0)
    ends = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64)
    s_max, s_min = sde.sigma_ratio(ends).tolist()
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    sigmas = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    ts = sde.t_from_sigma_ratio(sigmas)
    ts[0], ts[-1] = sde.t_max, sde.t_min
    return ts.to(dtype=dtype, device=device)


GRIDS = {"uniform": uniform_t, "log_snr": uniform_log_snr, "edm": edm_rho}


def make_grid(name: str, sde: SDE, steps: int, dtype=torch.float32, device=None, to_zero: bool = False) -> Tensor:
    """The named grid with `steps` steps from t_max to t_min; with to_zero, `steps - 1` of them and a last step
    from t_min to t = 0, where sigma = 0 for every SDE here (k-diffusion's and diffusers' default ending)."""
    if name not in GRIDS:
        raise ValueError(f"unknown time grid {name!r}; expected one of {sorted(GRIDS)}")
    if not to_zero:
        return GRIDS[name](sde, steps, dtype=dtype, device=device)
    _check_steps(steps)
    head = GRIDS[name](sde, steps - 1, dtype=dtype, device=device) if steps > 1 else \
        torch.tensor([sde.t_max], dtype=dtype, device=device)
    return torch.cat([head, head.new_zeros(1)])
