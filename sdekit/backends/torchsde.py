"""Reverse-time SDE through `torchsde.sdeint`, with any of its methods.

torchsde integrates forward in time, so the reverse SDE is written in s = -t:
    dx = -[f(x, -s) - g(-s)^2 score(x, -s)] ds + g(-s) dW_s,   s from -t_max to -t_min,
which is the reverse SDE dx = [f - g^2 score] dt + g dW-bar with dt = -ds. The noise is additive
(g depends on t only), so the Ito and Stratonovich forms coincide and Stratonovich-only methods
(heun, midpoint, reversible_heun, ...) solve the same equation.

With explicit `noise` (N, B, *S), the Brownian increment over grid interval i is
sqrt(t_i - t_{i+1}) noise[i], exactly what `sdekit.samplers.euler_maruyama` uses; torchsde's
'euler' then reproduces sdekit's path to round-off.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torchsde
from torch import Tensor

from ..sde import SDE

__all__ = ["reverse_sde", "ITO_METHODS", "STRATONOVICH_METHODS"]

ITO_METHODS = ("euler", "milstein", "srk")
STRATONOVICH_METHODS = ("heun", "midpoint", "euler_heun", "log_ode", "milstein", "reversible_heun")
_LEVY_AREA = {"srk": "space-time", "log_ode": "space-time"}   # methods that need more than increments


class _ReverseSDE(torch.nn.Module):
    noise_type = "diagonal"

    def __init__(self, score_fn: Callable, sde: SDE, shape: tuple, sde_type: str):
        super().__init__()
        self.score_fn, self.sde, self.shape, self.sde_type = score_fn, sde, shape, sde_type

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        t = (-s).to(y.dtype).expand(y.shape[0])
        x = y.reshape(self.shape)
        return -self.sde.reverse_drift(x, t, self.score_fn(x, t)).reshape(y.shape)

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        return self.sde.diffusion((-s).to(y.dtype)).expand(y.shape)


class _GivenIncrements(torchsde.BaseBrownian):
    """Brownian motion that returns given increments dW[i] (N, B, D) over the grid interval [s_i, s_{i+1}]."""

    __slots__ = ("_grid", "_dW")

    def __init__(self, grid: Tensor, dW: Tensor):
        self._grid, self._dW = grid, dW

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise ValueError("given increments only provide W(t_{i+1}) - W(t_i) over grid intervals; "
                             "use a method that needs no Levy area (euler, milstein, heun, midpoint, euler_heun)")
        i = int(torch.argmin((self._grid - float(ta)).abs()))
        if i >= len(self._dW) or abs(float(tb) - float(self._grid[i + 1])) > 1e-9 * max(1.0, abs(float(tb))):
            raise ValueError(f"requested increment over [{float(ta)}, {float(tb)}], which is not one grid interval")
        return self._dW[i]

    def __repr__(self):
        return f"_GivenIncrements(steps={len(self._dW)})"

    @property
    def dtype(self):
        return self._dW.dtype

    @property
    def device(self):
        return self._dW.device

    @property
    def shape(self):
        return self._dW.shape[1:]

    @property
    def levy_area_approximation(self):
        return "none"


def reverse_sde(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, method: str = "euler",
                noise: Tensor | None = None, generator: torch.Generator | None = None, dt: float | None = None) -> Tensor:
    """Integrate the reverse SDE from ts[0] to ts[-1] with torchsde; returns x at ts[-1].

    score_fn(x: (B, *S), t: (B,)) -> (B, *S); x: (B, *S) at ts[0]; ts: (N+1,) decreasing.
    method: a torchsde method name. noise: (N, B, *S) standard normals giving the increments
    (one solver step per grid interval); otherwise torchsde's BrownianInterval seeded from generator
    is used and each interval is split into steps of at most dt (default: the interval itself).
    """
    if method not in set(ITO_METHODS) | set(STRATONOVICH_METHODS):
        raise ValueError(f"unknown torchsde method {method!r}; expected one of {sorted(set(ITO_METHODS) | set(STRATONOVICH_METHODS))}")
    ts = torch.as_tensor(ts, dtype=x.dtype, device=x.device)
    if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"ts must be a strictly decreasing 1-D grid with at least 2 points, got {tuple(ts.shape)}")
    B, shape = x.shape[0], tuple(x.shape)
    grid = -ts.double()                     # increasing s; float64 times (float32 times can stall BrownianInterval)
    y = x.reshape(B, -1)
    sde_type = "ito" if method in ITO_METHODS else "stratonovich"
    model = _ReverseSDE(score_fn, sde, shape, sde_type)
    if noise is not None:
        if tuple(noise.shape) != (len(ts) - 1, *shape):
            raise ValueError(f"noise must have shape ({len(ts) - 1}, {', '.join(map(str, shape))}), got {tuple(noise.shape)}")
        if method in _LEVY_AREA:
            raise ValueError(f"method {method!r} needs Levy area, which explicit increments do not provide")
        dW = torch.sqrt(grid[1:] - grid[:-1]).reshape(-1, 1, 1) * noise.reshape(len(ts) - 1, B, -1).to(grid)
        dW = dW.to(x.dtype)
        bm = _GivenIncrements(grid, dW)
        dt = None
    else:
        entropy = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        bm = torchsde.BrownianInterval(t0=float(grid[0]), t1=float(grid[-1]), size=y.shape, dtype=y.dtype, device=y.device,
                                       levy_area_approximation=_LEVY_AREA.get(method, "none"), entropy=entropy)
    for i in range(len(ts) - 1):
        span = grid[i:i + 2]
        width = float(span[1] - span[0])
        n_sub = 1 if dt is None else max(1, math.ceil(width / float(dt) - 1e-9))
        # A hair over width / n_sub: torchsde clamps the last step to the interval's end, so round-off in
        # s + step can never leave a spurious tiny extra step.
        y = torchsde.sdeint(model, y, span, method=method, dt=width / n_sub * (1 + 1e-9), bm=bm)[-1]
    return y.reshape(shape)
