"""The torchsde adapter: the reverse-time SDE through `torchsde.sdeint` (any of its methods), and `GridBrownian`.

The only module in sdekit that imports torchsde (`sensitivity.adjoint` takes it from here); without the
[torchsde] extra, importing this module raises an ImportError that says so.

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
from collections.abc import Callable

import torch
from torch import Tensor

from .._imports import require
from ..sde import SDE

torchsde = require("torchsde", __name__)

__all__ = ["reverse_sde", "GridBrownian", "brownian_interval", "ITO_METHODS", "STRATONOVICH_METHODS"]

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


class GridBrownian(torchsde.BaseBrownian):
    """A torchsde Brownian path through given increments dW: (N, B, D) on an increasing grid: (N+1,).

    A query over one grid interval [grid[i], grid[i+1]] returns dW[i] exactly (so a fixed-step solve on
    the grid uses exactly these increments); W at other times interpolates the cumulative sums linearly
    (made at the first such query: a solve on the grid holds no copy of the path).
    strict=True refuses any query that is not one grid interval, so a solver that sub-steps fails loudly.
    """

    __slots__ = ("grid", "dW", "_W", "strict")

    def __init__(self, grid: Tensor, dW: Tensor, strict: bool = False):
        self.grid, self.dW, self.strict = grid.contiguous(), dW, strict
        self._W = None

    @property
    def W(self) -> Tensor:
        """The path at the grid times, W(grid[0]) = 0: (N+1, B, D)."""
        if self._W is None:
            self._W = torch.cat([torch.zeros_like(self.dW[:1]), self.dW.cumsum(0)])
        return self._W

    def _at(self, t) -> Tensor:
        t = torch.as_tensor(t, dtype=self.grid.dtype).clamp(self.grid[0], self.grid[-1])
        i = int(torch.searchsorted(self.grid, t.reshape(1), right=True).clamp(1, len(self.grid) - 1))
        w = (t - self.grid[i - 1]) / (self.grid[i] - self.grid[i - 1])
        return self.W[i - 1] + w.to(self.W.dtype) * (self.W[i] - self.W[i - 1])

    def _interval(self, ta, tb) -> int | None:
        i = int(torch.argmin((self.grid - float(ta)).abs()))
        tol = 1e-9 * max(1.0, abs(float(tb)))
        if i < len(self.dW) and abs(float(ta) - float(self.grid[i])) <= tol and abs(float(tb) - float(self.grid[i + 1])) <= tol:
            return i
        return None

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise ValueError("given increments carry no Levy area; use a method that needs none "
                             "(euler, milstein, heun, midpoint, euler_heun)")
        i = None if tb is None else self._interval(ta, tb)
        if i is not None:
            return self.dW[i]
        if self.strict:
            raise ValueError(f"requested the path over [{float(ta)}, {tb if tb is None else float(tb)}], which is not one grid interval")
        return self._at(ta) if tb is None else self._at(tb) - self._at(ta)

    def __repr__(self):
        return f"GridBrownian(steps={len(self.dW)})"

    @property
    def dtype(self):
        return self.dW.dtype

    @property
    def device(self):
        return self.dW.device

    @property
    def shape(self):
        return self.dW.shape[1:]

    @property
    def levy_area_approximation(self):
        return "none"


def brownian_interval(ts: Tensor, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                      levy_area: bool = False, dtype: torch.dtype | None = None, device=None, **kwargs):
    """torchsde's BrownianInterval over the interval of the grid ts (increasing or decreasing), for `simulate(bm=...)`.

    shape: (B, m), the increments' shape for the noise type. The entropy is one draw from `generator` (a seed gives
    the same path); levy_area=True adds space-time Levy area (srk). dtype/device default to ts's. kwargs go to
    BrownianInterval (e.g. dt, cache_size). sdekit reads such a path through its call protocol (it never imports
    torchsde for that); this helper only builds one. sdekit's own paths (BrownianGrid, VirtualBrownianTree) follow
    the same protocol, so torchsde.sdeint accepts them as bm too.
    """
    t = ts.detach().to("cpu", torch.float64)
    entropy = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                device=generator.device if generator is not None else "cpu"))
    return torchsde.BrownianInterval(t0=float(t.min()), t1=float(t.max()), size=tuple(shape), dtype=dtype or ts.dtype,
                                     device=device if device is not None else ts.device, entropy=entropy,
                                     levy_area_approximation="space-time" if levy_area else "none", **kwargs)


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
        bm = GridBrownian(grid, dW, strict=True)
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
