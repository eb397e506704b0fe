"""One-step maps of the discrete schemes, their registry, and the input checks their solvers share.

A scheme's step is a plain function `step(f, g, t, h, x, theta, dW) -> x_next` that is a differentiable
function of (x, theta); `SCHEMES` registers each under its name with the calculus it solves in
(`sde_type`: Euler-Maruyama and Milstein converge to the Ito solution, stochastic Heun to the
Stratonovich one) and its strong order. These maps are the only definition of the schemes: the primal solver
`sdekit.simulate` runs them (traced once into straight-line code when no gradient is needed),
forward sensitivities are their Jacobian-vector products and backprop their vector-Jacobian products,
so every method differentiates exactly the map the primal solver runs.

Diagonal noise: g(t, x, theta) -> (B, d) and component i is driven by dW_i alone. As in torchsde's
"diagonal" noise type, g_i may depend on x_i only; the Milstein correction relies on it.
Steps may go backwards in time (h < 0, e.g. reverse-time samplers): the Brownian increments are
then those of the reverse-time motion, whose quadratic variation over a step is |h|.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["euler_step", "milstein_step", "heun_step", "Scheme", "SCHEMES", "STRONG_ORDER", "get_scheme", "step_map",
           "check_inputs", "check_diagonal_noise"]

Field = Callable[[Tensor, Tensor, Tensor], Tensor]


def euler_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor) -> Tensor:
    """Euler-Maruyama (Ito): x + f h + g dW."""
    return x + f(t, x, theta) * h + g(t, x, theta) * dW


def milstein_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor,
                  dg: Field | None = None) -> Tensor:
    """Milstein (Ito, diagonal noise): x + f h + g dW + 1/2 g_i dg_i/dx_i (dW_i^2 - |h|).

    g_i dg_i/dx_i is one JVP of g along the direction g itself ((dg/dx) g, whose i-th entry is
    g_i dg_i/dx_i for diagonal noise), or g * dg(t, x, theta) when dg = dg_i/dx_i (B, d) is given;
    being a function of (x, theta) like the rest of the step, its x- and theta-derivatives enter the
    sensitivities consistently.
    """
    gx = g(t, x, theta)
    if dg is not None:
        gdg = gx * dg(t, x, theta)
    else:
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


@dataclass(frozen=True)
class Scheme:
    """A registered scheme: its one-step map and what it converges to (calling the scheme calls its step).

    sde_type: "ito" or "stratonovich", the solution the scheme converges to (a Stratonovich scheme solves
    an Ito SDE when given the Stratonovich drift f - 1/2 g dg/dx). strong_order: the rate of
    E|X_T - X(T)| in the step size for diagonal noise, the noise these steps take.
    """

    step: Callable[..., Tensor]
    sde_type: str
    strong_order: float

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.step(*args, **kwargs)


SCHEMES: dict[str, Scheme] = {
    "euler": Scheme(euler_step, "ito", 0.5),
    "milstein": Scheme(milstein_step, "ito", 1.0),
    "heun": Scheme(heun_step, "stratonovich", 1.0),     # order 1 for commutative (e.g. diagonal) noise
}
STRONG_ORDER = {name: s.strong_order for name, s in SCHEMES.items()}   # a view of SCHEMES


def get_scheme(name: str) -> Scheme:
    """The registered scheme called `name`; ValueError naming the registered ones otherwise."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; expected one of {sorted(SCHEMES)}")
    return SCHEMES[name]


def step_map(scheme: str, f: Field, g: Field, dg: Field | None = None) -> Callable[..., Tensor]:
    """The scheme's map with the fields bound: (t, h, x, dW, theta) -> x_next (theta last, as solvers hold it fixed)."""
    step = get_scheme(scheme).step
    if scheme == "milstein" and dg is not None:
        return lambda t, h, x, dw, th: milstein_step(f, g, t, h, x, th, dw, dg)
    return lambda t, h, x, dw, th: step(f, g, t, h, x, th, dw)


def check_inputs(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None, scheme: str,
                 save: str = "end") -> None:
    """Raise early, naming the bad input, unless the shapes fit x0 (B, d), theta (P,), ts (N+1,), dW (N, B, d) (or None)."""
    get_scheme(scheme)
    if save not in ("path", "end"):
        raise ValueError(f"unknown save {save!r}; expected 'path' or 'end'")
    for name, v in (("x0", x0), ("theta", theta), ("ts", ts), ("dW", dW)):
        if v is None and name == "dW":
            continue
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
    if dW is not None and dW.shape != (N, *x0.shape):
        raise ValueError(f"dW must be (N, B, d) = ({N}, {x0.shape[0]}, {x0.shape[1]}) for ts of length {N + 1} "
                         f"and x0 of shape {tuple(x0.shape)}, got {tuple(dW.shape)}")
    dtypes = {x0.dtype, theta.dtype, ts.dtype} | ({dW.dtype} if dW is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"x0, theta, ts and dW must share one dtype, got x0 {x0.dtype}, theta {theta.dtype}, "
                        f"ts {ts.dtype}, dW {None if dW is None else dW.dtype}")
    if scheme == "milstein":
        check_diagonal_noise(g, ts[0], x0, theta, scheme)
    with torch.no_grad():
        for name, fn in (("f", f), ("g", g)):
            out = fn(ts[0], x0[:1], theta)
            if not isinstance(out, Tensor) or out.shape != x0[:1].shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{name}(t, x, theta) must return x's shape (B, d) (diagonal noise for g); "
                                 f"for x of shape {tuple(x0[:1].shape)} it returned {got}")


def check_diagonal_noise(g: Field, t: Tensor, x0: Tensor, theta: Tensor, scheme: str, samples: int = 4) -> None:
    """Raise ValueError unless g_i(t, x, theta) depends on x_i only, at the first `samples` rows of x0.

    The Jacobian dg/dx is diagonal exactly when its products with any two directions u, w satisfy
    (J u) w = (J w) u elementwise, so two JVPs test it whatever d is. u and w are fixed, irregular
    sequences in [0.5, 1.5) (no random draw: this may run under vmap).
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return          # inside vmap/grad no value can be branched on; solvers that vmap check before they do
    x = x0[:samples].detach()
    th = theta.detach()
    k = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).reshape(x.shape)
    u, w = ((k * c).frac().add(0.5).to(x.dtype) for c in (0.6180339887498949, 0.41421356237309515))
    field = lambda y: g(t.detach(), y, th)                 # noqa: E731
    ju = torch.func.jvp(field, (x,), (u,))[1]
    jw = torch.func.jvp(field, (x,), (w,))[1]
    lhs, rhs = ju * w, jw * u
    bad = (lhs - rhs).abs() > 1e3 * torch.finfo(x.dtype).eps * (lhs.abs() + rhs.abs())
    if bad.any():
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"scheme {scheme!r} needs diagonal noise: g_i(t, x, theta) may depend on x_i only (its correction "
            f"term is g_i dg_i/dx_i), but g_{i} changes with other components of x (sample {b} of x0). "
            "Use 'euler' or 'heun', which accept such a g.")

