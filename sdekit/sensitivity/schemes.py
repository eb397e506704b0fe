"""One-step maps of the discrete schemes, the primal solver, and the input checks they share.

A scheme is a plain function `step(f, g, t, h, x, theta, dW) -> x_next` that is a differentiable
function of (x, theta): forward sensitivities are its Jacobian-vector products and backprop is its
vector-Jacobian products, so both differentiate exactly the same discrete map.

Diagonal noise: g(t, x, theta) -> (B, d) and component i is driven by dW_i alone. As in torchsde's
"diagonal" noise type, g_i may depend on x_i only; the Milstein correction relies on it.
Steps may go backwards in time (h < 0, e.g. reverse-time samplers): the Brownian increments are
then those of the reverse-time motion, whose quadratic variation over a step is |h|.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["euler_step", "milstein_step", "heun_step", "SCHEMES", "STRONG_ORDER", "SDE_SENSE", "solve",
           "check_inputs", "brownian_increments"]

Field = Callable[[Tensor, Tensor, Tensor], Tensor]


def euler_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor) -> Tensor:
    """Euler-Maruyama (Ito): x + f h + g dW."""
    return x + f(t, x, theta) * h + g(t, x, theta) * dW


def milstein_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor) -> Tensor:
    """Milstein (Ito, diagonal noise): x + f h + g dW + 1/2 g_i dg_i/dx_i (dW_i^2 - |h|).

    g_i dg_i/dx_i is one JVP of g along the direction g itself ((dg/dx) g, whose i-th entry is
    g_i dg_i/dx_i for diagonal noise); being a function of (x, theta) like the rest of the step,
    its x- and theta-derivatives enter the sensitivities consistently.
    """
    gx = g(t, x, theta)
    _, gdg = torch.func.jvp(lambda y: g(t, y, theta), (x,), (gx,))
    return x + f(t, x, theta) * h + gx * dW + 0.5 * gdg * (dW * dW - h.abs())


def heun_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor) -> Tensor:
    """Stochastic Heun: converges to the **Stratonovich** solution of dX = f dt + g o dW.

    Predictor x~ = x + f h + g dW, corrector x + (f + f~) h/2 + (g + g~) dW/2. To approximate an Ito
    SDE with it, pass the Stratonovich drift f - 1/2 g dg/dx.
    """
    f0, g0 = f(t, x, theta), g(t, x, theta)
    x_pred = x + f0 * h + g0 * dW
    t1 = t + h
    return x + 0.5 * (f0 + f(t1, x_pred, theta)) * h + 0.5 * (g0 + g(t1, x_pred, theta)) * dW


SCHEMES: dict[str, Callable[..., Tensor]] = {"euler": euler_step, "milstein": milstein_step, "heun": heun_step}
STRONG_ORDER = {"euler": 0.5, "milstein": 1.0, "heun": 1.0}     # heun: 1 for commutative (e.g. diagonal) noise
SDE_SENSE = {"euler": "ito", "milstein": "ito", "heun": "stratonovich"}


def check_inputs(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, scheme: str,
                 save: str = "end") -> None:
    """Raise early, naming the bad input, unless the shapes fit x0 (B, d), theta (P,), ts (N+1,), dW (N, B, d)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    if save not in ("path", "end"):
        raise ValueError(f"unknown save {save!r}; expected 'path' or 'end'")
    for name, v in (("x0", x0), ("theta", theta), ("ts", ts), ("dW", dW)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {v.dtype}")
    if x0.ndim != 2:
        raise ValueError(f"x0 must be (B, d), got shape {tuple(x0.shape)}")
    if theta.ndim != 1:
        raise ValueError(f"theta must be (P,), got shape {tuple(theta.shape)}")
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be (N+1,) with N >= 1, got shape {tuple(ts.shape)}")
    steps = ts[1:] - ts[:-1]
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError("ts must be strictly monotone (increasing, or decreasing for reverse-time solves)")
    N = ts.shape[0] - 1
    if dW.shape != (N, *x0.shape):
        raise ValueError(f"dW must be (N, B, d) = ({N}, {x0.shape[0]}, {x0.shape[1]}) for ts of length {N + 1} "
                         f"and x0 of shape {tuple(x0.shape)}, got {tuple(dW.shape)}")
    dtypes = {x0.dtype, theta.dtype, ts.dtype, dW.dtype}
    if len(dtypes) != 1:
        raise TypeError(f"x0, theta, ts and dW must share one dtype, got x0 {x0.dtype}, theta {theta.dtype}, "
                        f"ts {ts.dtype}, dW {dW.dtype}")
    with torch.no_grad():
        for name, fn in (("f", f), ("g", g)):
            out = fn(ts[0], x0[:1], theta)
            if not isinstance(out, Tensor) or out.shape != x0[:1].shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{name}(t, x, theta) must return x's shape (B, d) (diagonal noise for g); "
                                 f"for x of shape {tuple(x0[:1].shape)} it returned {got}")


def solve(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, scheme: str = "euler",
          save: str = "path", trace: bool = False) -> Tensor:
    """The primal path of the scheme: (N+1, B, d) with save="path", X at ts[-1] (B, d) with save="end".

    Differentiable by autograd in x0 and theta (this is what `backprop` differentiates).
    trace=True runs a traced copy of the step (see `tracing`; faster, not differentiable by autograd).
    """
    check_inputs(f, g, x0, theta, ts, dW, scheme, save)
    step = SCHEMES[scheme]
    h = ts[1:] - ts[:-1]
    one_step = lambda t, hn, x, dw, th: step(f, g, t, hn, x, th, dw)
    if trace:
        from .tracing import cached_trace
        k = 1 if h.shape[0] > 1 else 0
        x0, theta = x0.detach(), theta.detach()
        key = ("solve", f, g, scheme, *x0.shape, theta.shape[0], x0.dtype, x0.device)
        one_step = cached_trace(key, lambda: one_step, (ts[0], h[0], x0, dW[0], theta),
                                (ts[k], h[k], x0 + 0.01 * dW[k], dW[k], theta))
    x, xs = x0, [x0]
    for n in range(h.shape[0]):
        x = one_step(ts[n], h[n], x, dW[n], theta)
        if save == "path":
            xs.append(x)
    return torch.stack(xs) if save == "path" else x


def brownian_increments(ts: Tensor, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Independent increments sqrt(|dt_n|) z_n: (N, *shape) in ts's dtype."""
    h = (ts[1:] - ts[:-1]).abs()
    z = torch.randn((h.shape[0], *shape), generator=generator, dtype=ts.dtype, device=ts.device)
    return z * h.sqrt().reshape(-1, *([1] * len(shape)))
