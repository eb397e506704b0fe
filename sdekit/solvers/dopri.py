"""Adaptive Dormand-Prince 5(4) (Dormand & Prince 1980; step control after Hairer, Norsett & Wanner, II.4).

`dopri5` is a batched integrator for any dy/dt = f(t, y) on tensors y: (B, *S); one step size is
shared by the batch and controlled by the worst sample's scaled RMS error, so every sample meets
rtol/atol. `sdekit.samplers.rk45` applies it to the probability-flow ODE; `sdekit.likelihood` applies
it to the ODE augmented with the divergence.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["dopri5", "check_tolerances"]

# Butcher tableau. The 5th-order weights B5 equal the last row of A (first same as last: the
# derivative at the accepted point is the next step's first stage).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = _A[6] + (0.0,)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))   # error estimate weights: y5 - y4


def check_tolerances(rtol: float, atol: float, who: str) -> None:
    """ValueError naming `who` unless rtol > 0 and atol >= 0 are finite numbers."""
    if not (isinstance(rtol, (int, float)) and rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"{who}: rtol must be a finite number > 0, got {rtol!r}")
    if not (isinstance(atol, (int, float)) and atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"{who}: atol must be a finite number >= 0, got {atol!r}")


def _error_norm(err: Tensor, y0: Tensor, y1: Tensor, rtol: float, atol: float) -> float:
    """max over the batch of the per-sample RMS of err / (atol + rtol max(|y0|, |y1|))."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    ratio = (err / scale).reshape(err.shape[0], -1)
    return float(ratio.pow(2).mean(1).sqrt().max())


def _initial_step(f: Callable, t0: float, y0: Tensor, f0: Tensor, direction: float, rtol: float, atol: float) -> float:
    """Hairer's starting step size (II.4, 'Starting Step Size'); one extra evaluation of f."""
    scale = atol + rtol * y0.abs()
    rms = lambda v: float((v / scale).reshape(v.shape[0], -1).pow(2).mean(1).sqrt().max())
    d0, d1 = rms(y0), rms(f0)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = f(torch.tensor(t0 + direction * h0, dtype=y0.dtype, device=y0.device), y0 + direction * h0 * f0)
    d2 = rms(f1 - f0) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def dopri5(f: Callable[[Tensor, Tensor], Tensor], y: Tensor, ts, *, rtol: float = 1e-5, atol: float = 1e-5,
           h0: float | None = None, max_steps: int = 100_000, info: dict | None = None,
           callback: Callable | None = None) -> Tensor:
    """Integrate dy/dt = f(t, y) through the monotone grid ts (N+1,) and return y at ts[-1].

    f(t: () tensor, y: (B, *S)) -> (B, *S); y: (B, *S) at ts[0]. ts may increase or decrease; the
    solver steps adaptively inside each interval and lands exactly on every grid point, calling
    callback(i, ts[i+1], y) there. info (if given) gains 'accepted' and 'rejected' step counts.
    """
    check_tolerances(rtol, atol, "dopri5")
    grid = [float(t) for t in ts]
    if len(grid) < 2:
        raise ValueError(f"dopri5: ts needs at least 2 points, got {len(grid)}")
    direction = 1.0 if grid[-1] > grid[0] else -1.0
    if any((b - a) * direction <= 0 for a, b in zip(grid, grid[1:])):
        raise ValueError("dopri5: ts must be strictly monotone")
    as_t = lambda s: torch.tensor(s, dtype=y.dtype, device=y.device)
    t = grid[0]
    k1 = f(as_t(t), y)
    h = _initial_step(f, t, y, k1, direction, rtol, atol) if h0 is None else abs(float(h0))
    accepted = rejected = 0
    for i, t_end in enumerate(grid[1:]):
        while (t_end - t) * direction > 0:
            if accepted + rejected >= max_steps:
                raise RuntimeError(f"dopri5: more than max_steps={max_steps} steps between t={grid[0]} and t={grid[-1]}; "
                                   f"loosen rtol={rtol}/atol={atol} or raise max_steps")
            last = h >= abs(t_end - t) * (1 - 1e-12)
            step = abs(t_end - t) if last else h
            dt = direction * step
            k = [k1]
            for s in range(1, 7):
                ys = y + dt * sum(a * kj for a, kj in zip(_A[s], k) if a != 0.0)
                k.append(f(as_t(t_end if (last and _C[s] == 1.0) else t + _C[s] * dt), ys))
            y_new = ys                                             # stage 7 is evaluated at the 5th-order solution
            err = dt * sum(e * kj for e, kj in zip(_E, k) if e != 0.0)
            norm = _error_norm(err, y, y_new, rtol, atol)
            if not math.isfinite(norm):
                raise FloatingPointError(f"dopri5: non-finite error estimate at t={t}; the vector field returned inf/nan")
            if norm <= 1.0:
                t, y, k1 = (t_end if last else t + dt), y_new, k[6]
                accepted += 1
                factor = 10.0 if norm == 0 else min(10.0, max(0.2, 0.9 * norm ** -0.2))
                h = step * factor if not last else max(h, step * factor)
            else:
                rejected += 1
                h = step * max(0.2, 0.9 * norm ** -0.2)
            if h < 1e-14 * max(1.0, abs(t)):
                raise RuntimeError(f"dopri5: step size underflow at t={t}; the problem may be stiff or the tolerances too tight")
        if callback is not None:
            callback(i, ts[i + 1], y)
    if info is not None:
        info["accepted"] = info.get("accepted", 0) + accepted
        info["rejected"] = info.get("rejected", 0) + rejected
    return y
