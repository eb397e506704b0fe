"""Gradients of mean_b L(X_T^b) in memory that does not grow like backprop's tape: sdekit's own backward passes,
and torchsde's stochastic adjoint for comparison.

backend="native" (default)
  - reversible_heun (and any scheme with an exact inverse step, `Scheme.inverse`): the reversible adjoint of Kidger,
    Foster, Li and Lyons (2021, "Efficient and accurate gradients for neural SDEs"). The forward pass keeps only
    the final state (x, z, f(z), g(z)). The backward pass walks the grid from the end: each step rebuilds the state
    at t_n from the state at t_{n+1} with the scheme's inverse step (exact in exact arithmetic, so the rebuilt path
    is the forward path up to round-off), then takes the vector-Jacobian product of the forward step map at that
    state. The gradient is therefore backprop's through the same discrete solve (to round-off: 1e-10 relative in
    float64 in the tests), with memory independent of N: one state, one adjoint, one step's intermediates.
    With trace=True (under `simulate(trace=True)`'s purity contract) the per-step backward (inverse step + VJP)
    is traced once into straight-line code, like the forward step; by default it runs eagerly.
  - any other scheme: checkpointed backprop. The forward pass stores the state every ceil(N / checkpoints) steps
    (default checkpoints = ceil(sqrt(N))); the backward pass re-runs each segment from its checkpoint, last segment
    first, keeping its states, and walks it backwards with one vector-Jacobian product of the step map per step
    (traced with trace=True, like the reversible adjoint's). Memory O(checkpoints + N / checkpoints) states and no tape, O(sqrt(N))
    by default; time: two primal solves plus one VJP per step. Pass `checkpoints=` to trade memory for time.
backend="checkpoint": checkpointed backprop for any scheme (reversible_heun too).
backend="torchsde": `torchsde.sdeint_adjoint` on the same Brownian increments (via `sdekit.interop.torchsde`), with
  every grid point (uniform or not) a step end, as in sdekit's solve (one call in integer time on a uniform grid, one
  call per interval chained by autograd otherwise). torchsde solves the continuous adjoint SDE backwards with its
  own discretisation, so the gradient matches backprop up to that discretisation error, which shrinks with the step;
  reversible_heun with adjoint_reversible_heun is algebraically reversible and matches backprop to round-off.
  Reverse-time grids are solved in s = -t.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..solvers import Field, get_scheme, init_state, inverse_map, per_step, step_map
from ..solvers._tracing import cached_trace, field_state
from ._common import check_wrt, increments, irregular, primal_runner

__all__ = ["mean_gradient", "BACKENDS"]

BACKENDS = ("native", "checkpoint", "torchsde")


def mean_gradient(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None,
                  loss: Callable[[Tensor], Tensor], scheme: str = "reversible_heun", *, noise: str = "diagonal",
                  levy_area: Tensor | None = None, bm=None, backend: str = "native", checkpoints: int | None = None,
                  wrt: str = "theta", dg: Field | None = None, trace: bool = False, adjoint_method: str | None = None):
    """d/dtheta of mean_b L(X_T^b) for the scheme's solve on ts driven by dW: (P,) (wrt="x0": (B, d); "both": the pair).

    f, g, x0 (B, d), theta (P,), ts (N+1,), dW (N, B, m), levy_area, bm, noise, scheme: as `sdekit.simulate`.
    loss: (B, d) -> (B,). backend: "native" (reversible adjoint for reversible_heun, checkpointed backprop for
    other schemes), "checkpoint" (checkpointed backprop for any scheme), or "torchsde" (torchsde's adjoint SDE;
    adjoint_method defaults to the scheme's own, "adjoint_reversible_heun" for reversible_heun).
    checkpoints: stored states for checkpointed backprop (default ceil(sqrt(N))); memory budget in states.
    """
    check_wrt(wrt)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "torchsde":
        return _torchsde(f, g, x0, theta, ts, dW, loss, scheme, noise, levy_area, bm, wrt, adjoint_method)
    dW, H = increments(f, g, x0, theta, ts, dW, scheme, noise=noise, levy_area=levy_area, bm=bm)
    sch = get_scheme(scheme)
    if checkpoints is not None and (int(checkpoints) != checkpoints or checkpoints < 1):
        raise ValueError(f"checkpoints must be a positive integer, got {checkpoints!r}")
    theta, x0 = theta.detach(), x0.detach()
    dW = dW.detach()
    H = None if H is None else H.detach()
    if backend == "native" and sch.inverse is not None:
        a, g_theta = _reversible(f, g, x0, theta, ts, dW, H, loss, scheme, noise, dg, trace)
    else:
        a, g_theta = _checkpointed(f, g, x0, theta, ts, dW, H, loss, scheme, noise, dg, trace, checkpoints)
    # through the initial state (x0 itself, or the scheme's init)
    if sch.stateful:
        init = lambda x, th: tuple(init_state(scheme, f, g, ts[0], x, th, noise=noise))   # noqa: E731
        _, vjp = torch.func.vjp(init, x0, theta)
        g_x0, g_th0 = vjp(a)
        g_theta = g_theta + g_th0
    else:
        g_x0 = a[0]
    return {"theta": g_theta, "x0": g_x0, "both": (g_theta, g_x0)}[wrt]


def _end_adjoint(y: tuple, loss: Callable) -> tuple:
    """The adjoint of the final state: d mean L(x_N)/dx_N for x, zero for the rest of the state."""
    with torch.enable_grad():
        x = y[0].detach().requires_grad_(True)
        a_x = torch.autograd.grad(loss(x).mean(), x)[0]
    return (a_x, *(torch.zeros_like(v) for v in y[1:]))


def _forward_pass(run, y: tuple, ts: Tensor, incs: tuple, keep_every: int | None = None) -> tuple[tuple, dict]:
    """The primal solve with the traced step; returns the final state and, if asked, the states every keep_every steps."""
    h = ts[1:] - ts[:-1]
    kept = {}
    with torch.no_grad():
        for n, (t, hn, *w) in enumerate(per_step(ts, h, *incs)):
            if keep_every is not None and n % keep_every == 0:
                kept[n] = y
            y = run(t, hn, *y, *w)
    return y, kept


def _backward_step(scheme, f, g, dg, noise, ts, x0, theta, yN, a, incs, trace, rebuild: bool):
    """back(t, h, *state, *increments, *adjoint) -> (*state at t if rebuild, *adjoint at t, dtheta) for one step.

    rebuild=True: `state` is the state at t + h, and the step first rebuilds the state at t with the scheme's exact
    inverse (the reversible adjoint). rebuild=False: `state` is the state at t itself (checkpointed backprop).
    Then the vector-Jacobian product of the forward step map at that state with the adjoint at t + h. Traced once
    into straight-line code (theta hoisted), like the forward step.
    """
    sch = get_scheme(scheme)
    step = step_map(scheme, f, g, dg, noise=noise)
    inv = inverse_map(scheme, f, g, noise=noise) if rebuild else None
    wrap = (lambda y: tuple(y)) if sch.stateful else (lambda y: (y,))
    ns, nw = len(yN), len(incs)

    def back_step(t, hn, *args):
        ys, ws, th, a1 = args[:ns], args[ns:ns + nw], args[ns + nw], args[ns + nw + 1:]
        y = wrap(inv(t, hn, *ys, *ws, th)) if rebuild else ys
        _, vjp = torch.func.vjp(lambda *v: wrap(step(t, hn, *v[:-1], *ws, v[-1])), *y, th)
        return (*y, *vjp(tuple(a1))) if rebuild else vjp(tuple(a1))

    h = ts[1:] - ts[:-1]
    N = h.shape[0]
    if not trace:
        return lambda t, hn, *args: back_step(t, hn, *args[:ns + nw], theta, *args[ns + nw:])
    k = N - 2 if N > 1 else 0
    w_last = tuple(v[N - 1] for v in incs)
    wk = tuple(v[k] for v in incs)
    yk = tuple(v + 0.01 * irregular(v) for v in yN)
    ak = tuple(v + 0.1 * irregular(v) for v in a)
    key = ("adjoint-" + ("reversible" if rebuild else "checkpoint"), scheme, noise, incs[0].shape[-1],
           field_state(f, g, dg)[0], *x0.shape, theta.shape, x0.dtype, x0.device)
    bind = cached_trace(key, lambda: back_step, (ts[N - 1], h[N - 1], *yN, *w_last, theta, *a),
                        (ts[k], h[k], *yk, *wk, theta, *ak), invariant=(2 + ns + nw,))
    return bind(theta)


def _reversible(f, g, x0, theta, ts, dW, H, loss, scheme, noise, dg, trace):
    """The reversible adjoint: the path rebuilt backwards with the exact inverse step, one local VJP per step."""
    sch = get_scheme(scheme)
    wrap = (lambda y: tuple(y)) if sch.stateful else (lambda y: (y,))
    incs = (dW,) if H is None else (dW, H)
    run = primal_runner(scheme, f, g, x0, theta, ts, dW, H, noise=noise, dg=dg, trace=trace)
    y0 = wrap(init_state(scheme, f, g, ts[0], x0, theta, noise=noise))
    ns = len(y0)
    yN, _ = _forward_pass(run, y0, ts, incs)
    a = _end_adjoint(yN, loss)
    back = _backward_step(scheme, f, g, dg, noise, ts, x0, theta, yN, a, incs, trace, rebuild=True)
    h = ts[1:] - ts[:-1]
    y, g_theta = yN, torch.zeros_like(theta)
    with torch.no_grad():
        for n in range(h.shape[0] - 1, -1, -1):
            out = back(ts[n], h[n], *y, *(v[n] for v in incs), *a)
            y, a = out[:ns], out[ns:2 * ns]
            g_theta = g_theta + out[-1]
    return a, g_theta


def _checkpointed(f, g, x0, theta, ts, dW, H, loss, scheme, noise, dg, trace, checkpoints):
    """Checkpointed backprop: states stored every `seg` steps; each segment, last first, is re-run to recover its
    states, then walked backwards with one traced VJP of the step map per step. Holds ceil(N / seg) stored states
    plus one segment's seg states (no tape)."""
    sch = get_scheme(scheme)
    wrap = (lambda y: tuple(y)) if sch.stateful else (lambda y: (y,))
    incs = (dW,) if H is None else (dW, H)
    N = ts.shape[0] - 1
    n_ckpt = math.ceil(math.sqrt(N)) if checkpoints is None else min(int(checkpoints), N)
    seg = math.ceil(N / n_ckpt)
    run = primal_runner(scheme, f, g, x0, theta, ts, dW, H, noise=noise, dg=dg, trace=trace)
    y0 = wrap(init_state(scheme, f, g, ts[0], x0, theta, noise=noise))
    yN, kept = _forward_pass(run, y0, ts, incs, keep_every=seg)
    a = _end_adjoint(yN, loss)
    back = _backward_step(scheme, f, g, dg, noise, ts, x0, theta, yN, a, incs, trace, rebuild=False)
    h = ts[1:] - ts[:-1]
    g_theta = torch.zeros_like(theta)
    with torch.no_grad():
        for s in sorted(kept, reverse=True):
            e = min(s + seg, N)
            states = [kept.pop(s)]
            for n in range(s, e - 1):                        # the segment's states, recomputed from its checkpoint
                states.append(run(ts[n], h[n], *states[-1], *(v[n] for v in incs)))
            for n in range(e - 1, s - 1, -1):
                out = back(ts[n], h[n], *states.pop(), *(v[n] for v in incs), *a)
                a, g_theta = out[:-1], g_theta + out[-1]
    return a, g_theta


# --- torchsde's adjoint ------------------------------------------------------------------------------------------
_TORCHSDE_METHODS = {"euler": "euler", "milstein": "milstein", "srk": "srk", "euler_heun": "euler_heun", "heun": "heun",
                     "midpoint": "midpoint", "reversible_heun": "reversible_heun"}


class _SDE(nn.Module):
    """(f, g, theta) as a torchsde SDE in a time u with t = t0 + rate * u (dt = rate du; rate < 0 on reverse-time
    grids): drift rate * f, diffusion |rate|^(1/2) g, driven by B(u) = W(t) / |rate|^(1/2), a standard Brownian
    motion in u (Ito corrections and Milstein's dB^2 - du hold in u as torchsde writes them)."""

    def __init__(self, f: Field, g: Field, theta: Tensor, noise: str, sde_type: str, t0: float, rate: float):
        super().__init__()
        self.f_, self.g_, self.t0, self.rate = f, g, t0, rate
        self.noise_type, self.sde_type = noise, sde_type
        self.theta = nn.Parameter(theta.detach().clone())

    def f(self, u, y):
        return self.rate * self.f_(self.t0 + self.rate * u, y, self.theta)

    def g(self, u, y):
        return abs(self.rate) ** 0.5 * self.g_(self.t0 + self.rate * u, y, self.theta)


def _torchsde(f, g, x0, theta, ts, dW, loss, scheme, noise, levy_area, bm, wrt, adjoint_method):
    from ..interop.torchsde import GridBrownian, torchsde  # the adapter imports torchsde or names the [torchsde] extra
    if levy_area is not None or get_scheme(scheme).needs_levy_area:
        raise ValueError(f"backend='torchsde' replays given increments, which carry no Levy area; scheme {scheme!r} "
                         "needs it (use backend='native')")
    method = _TORCHSDE_METHODS[scheme]
    if adjoint_method is None:
        adjoint_method = "adjoint_reversible_heun" if scheme == "reversible_heun" else method
    if scheme == "reversible_heun" and adjoint_method != "adjoint_reversible_heun":
        # torchsde then drops the gradient carried by the solver's extra state (z, f(z), g(z)) between grid points
        raise ValueError(f"scheme 'reversible_heun' with backend='torchsde' needs adjoint_method="
                         f"'adjoint_reversible_heun', got {adjoint_method!r}")
    dW, _ = increments(f, g, x0, theta, ts, dW, scheme, noise=noise, bm=bm)
    sde_type, N = get_scheme(scheme).sde_type, ts.shape[0] - 1
    x = x0.detach().clone().requires_grad_(wrt != "theta")
    kw = dict(method=method, adjoint_method=adjoint_method)
    # torchsde's fixed-step loop adds dt to the time until it passes the next output time and interpolates back, so
    # sdekit's grid reaches it exactly only as a grid of integers (exact sums): a uniform grid is solved in one call
    # in u = n (t = ts[0] + u h); any other grid one interval per call (dt a hair over the interval: one step each
    # way), chained by autograd with the solver's extra state passed on.
    n = torch.arange(N + 1, dtype=torch.float64, device=ts.device)
    t64 = ts.detach().double()
    rate = float(t64[-1] - t64[0]) / N
    if (t64 - (t64[0] + rate * n)).abs().max() <= 8 * torch.finfo(ts.dtype).eps * t64.abs().max():
        sde = _SDE(f, g, theta, noise, sde_type, float(t64[0]), rate)
        u = n.to(ts.dtype)
        path = GridBrownian(u, dW / abs(rate) ** 0.5, strict=True)
        y = torchsde.sdeint_adjoint(sde, x, u[[0, -1]], bm=path, dt=1.0,
                                    adjoint_params=(sde.theta,), **kw)[-1]
    else:
        sign = 1.0 if bool(ts[-1] > ts[0]) else -1.0
        sde = _SDE(f, g, theta, noise, sde_type, 0.0, sign)
        u = (sign * ts).contiguous()         # increasing; the reverse-time increments dW are those of W(u)
        path = GridBrownian(u, dW, strict=True)
        y, extra = x, None
        for i in range(N):
            dt = float(u[i + 1].double() - u[i].double()) * (1 + 1e-6)
            ys, extra = torchsde.sdeint_adjoint(sde, y, u[i:i + 2], bm=path, dt=dt, adjoint_params=(sde.theta,),
                                                extra=True, extra_solver_state=extra, **kw)
            y = ys[-1]
    inputs = {"theta": (sde.theta,), "x0": (x,), "both": (sde.theta, x)}[wrt]
    grads = tuple(v.detach() for v in torch.autograd.grad(loss(y).mean(), inputs))
    return grads if wrt == "both" else grads[0]
