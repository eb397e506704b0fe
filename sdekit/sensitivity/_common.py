"""What every sensitivity method shares: the noise a solve reads, the directions it differentiates along, and
the traced primal step (`sdekit.solvers` does the solving; this only adapts its inputs).

Noise. A solve is driven by `dW` (N, B, m), plus `levy_area` (N, B, m) for schemes that read it (srk), or by a
Brownian path `bm` (sdekit's BrownianGrid / VirtualBrownianTree, torchsde's BrownianInterval / BrownianTree),
from which the increments over ts are read once (`increments`). Every method then sees the same numbers.

Directions (`wrt`): "theta" (P columns, dX/dtheta), "x0" (d columns, dX/dx0 per path: paths do not interact, so
the k-th unit vector moved in every row at once gives each row's k-th column), or "both" (theta first, then x0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..solvers import Field, check_inputs, get_scheme, init_state, step_map
from ..solvers._tracing import cached_trace, field_state
from ..solvers.brownian_path import as_path, check_path, path_chunks

__all__ = ["WRT", "increments", "check_wrt", "split_wrt", "irregular", "primal_runner", "noise_dim"]

WRT = ("theta", "x0", "both")


def check_wrt(wrt: str) -> None:
    if wrt not in WRT:
        raise ValueError(f"unknown wrt {wrt!r}; expected one of {list(WRT)} (dX/dtheta, dX/dx0, or both)")


def noise_dim(g: Field, x0: Tensor, theta: Tensor, ts: Tensor, noise: str) -> int:
    """m, the Brownian dimension of g for the noise type (d for diagonal noise)."""
    if noise == "diagonal":
        return x0.shape[1]
    with torch.no_grad():
        out = g(ts[0], x0[:1], theta)
    if not isinstance(out, Tensor) or out.ndim != 3:
        raise ValueError(f"g(t, x, theta) must return (B, d, m) for noise={noise!r}, got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    return out.shape[2]


def increments(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None, scheme: str, *,
               noise: str = "diagonal", levy_area: Tensor | None = None, bm=None, save: str = "end",
               check: bool = True) -> tuple[Tensor, Tensor | None]:
    """(dW, H): the Brownian increments (N, B, m) over ts and, for schemes that read it, the space-time Levy area
    H (N, B, m), from dW/levy_area or read from the Brownian path bm; the inputs checked as `simulate` checks them."""
    sch = get_scheme(scheme)
    if bm is not None:
        if dW is not None or levy_area is not None:
            raise ValueError("the Brownian motion is given twice: pass dW= (with levy_area=) or bm=, not both")
        path = as_path(bm)
        m = noise_dim(g, x0, theta, ts, noise)
        check_path(path, (x0.shape[0], m), x0.dtype, x0.device, noise, sch.needs_levy_area, scheme)
        read = next(path_chunks(path, ts, sch.needs_levy_area, ts.shape[0] - 1))
        dW, levy_area = read[0], (read[1] if sch.needs_levy_area else None)
    if dW is None:
        raise ValueError("pass the Brownian increments dW (N, B, m) over ts, or a Brownian path bm=")
    if sch.needs_levy_area and levy_area is None:
        raise ValueError(f"scheme {scheme!r} reads the space-time Levy area of every step: pass levy_area= (N, B, m) "
                         "with dW (H = U/|h| - dW/2, N(0, |h|/12), independent of dW), or a Brownian path bm= made with "
                         "levy_area=True")
    if check:
        check_inputs(f, g, x0, theta, ts, dW, scheme, save, noise=noise, levy_area=levy_area)
    return dW, (levy_area if sch.needs_levy_area else None)


def irregular(x: Tensor) -> Tensor:
    """A fixed, irregular field in [-0.5, 0.5) shaped like x (a generic point for checking a traced step)."""
    k = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).reshape(x.shape)
    return (k * 0.6180339887498949).frac().sub(0.5).to(x.dtype)


def split_wrt(J: Tensor, wrt: str, P: int):
    """J (..., P + d) of wrt="both" -> (J_theta (..., P), J_x0 (..., d)); J itself otherwise."""
    return (J[..., :P], J[..., P:]) if wrt == "both" else J


def primal_runner(scheme: str, f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, H: Tensor | None,
                  *, noise: str = "diagonal", dg: Field | None = None, trace: bool = False):
    """run(t, h, *state, dW_n, [H_n]) -> state: the scheme's step map with theta bound, run eagerly, or traced once
    into straight-line code with trace=True (as `simulate(trace=True)` runs it); the state is always a tuple (x,) or
    the scheme's own."""
    sch = get_scheme(scheme)
    step = step_map(scheme, f, g, dg, noise=noise)
    wrap = (lambda y: y) if sch.stateful else (lambda y: (y,))

    def fn(t, h, *a):
        return wrap(step(t, h, *a))

    if not trace:
        return lambda t, h, *a: fn(t, h, *a, theta)
    N = ts.shape[0] - 1
    k = 1 if N > 1 else 0
    h = ts[1:] - ts[:-1]
    w0 = (dW[0],) if H is None else (dW[0], H[0])
    wk = (dW[k],) if H is None else (dW[k], H[k])
    y0 = tuple(init_state(scheme, f, g, ts[0], x0, theta, noise=noise) if sch.stateful else (x0,))
    xk = x0 + 0.01 * irregular(x0)
    yk = tuple(init_state(scheme, f, g, ts[k], xk, theta, noise=noise) if sch.stateful else (xk,))
    key = ("sensitivity-primal", scheme, noise, dW.shape[-1], field_state(f, g, dg)[0], *x0.shape, theta.shape,
           x0.dtype, x0.device)
    nargs = 2 + len(y0) + len(w0) + 1
    bind = cached_trace(key, lambda: fn, (ts[0], h[0], *y0, *w0, theta), (ts[k], h[k], *yk, *wk, theta),
                        invariant=(nargs - 1,))
    return bind(theta)
