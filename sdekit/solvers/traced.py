"""`simulate(trace=True)`: the scheme's step traced once into straight-line aten code (`_tracing`), then run per step.

The contract, as `jax.jit`'s: f, g (and dg) are pure functions of (t, x, theta). Whatever else they read (module
weights, globals, attributes, closed-over tensors) is frozen into the trace when it is made, and receives no
gradient. The trace is cached per (scheme, fields, shapes); before reuse it is checked against the eager step at
this solve's second grid time (a change the check cannot see then gives the old answer: that is the contract).
A solve that differentiates x0, theta or the increments runs eagerly instead (the trace never tapes), and fields
that read tensors requiring grad are refused (ValueError): their gradient would be lost.

On small tensors a step costs the ops it launches, so this is the fast path for cheap fields: f and g inlined,
products fused into the sums that consume them, theta-only ops hoisted out of the loop. With noise other than
diagonal (on the CPU) the loop stores x, the scheme's state and the increments batch-innermost (`batch_inner`),
so that the (B, d, m) x (B, m) products vectorise over the batch instead of over d or m.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from ._tracing import cached_trace, double_buffered, field_state
from .problem import CHECK_EVERY, Solve, as_state, per_step

__all__ = ["solve_traced", "traced_step", "batch_inner"]


def check_pure(solve: Solve) -> None:
    """Refuse trace=True for fields that read tensors requiring grad (under autograd): the trace would drop their
    gradient. Decided on the eager first step, so a field that reads one tells us for certain."""
    if not torch.is_grad_enabled():
        return
    y = solve.init(solve.x0.detach(), solve.theta.detach())
    w = torch.full(solve.wshape, 0.1, dtype=solve.x0.dtype, device=solve.x0.device)   # (draws nothing)
    out = as_state(solve.step(solve.ts[0], solve.h[0], *y, *(w,) * (2 if solve.levy else 1), solve.theta.detach()))
    if any(v.requires_grad for v in (*y, *out)):
        raise ValueError("simulate(trace=True): f or g reads tensors that require grad (module parameters, closed-over "
                         "tensors), and a trace freezes what the fields read besides (t, x, theta), so their gradient "
                         "would be lost. Leave trace=False (the default eager solve tapes them), or solve under "
                         "torch.no_grad()")


def traced_step(solve: Solve, x0: Tensor, inner: bool = False) -> Callable:
    """run(t, h, *state, *increments) -> state: the scheme's step traced on this solve's shapes, theta bound."""
    f, g, theta, noise = solve.f, solve.g, solve.theta, solve.noise
    lay = batch_inner if inner else (lambda v: v)
    k = 1 if solve.N > 1 else 0
    fields = field_state(f, g, solve.dg)[0]
    key = ("simulate", solve.scheme, fields, *x0.shape, theta.shape, x0.dtype, x0.device)
    if noise != "diagonal":
        key = (*key, noise, solve.m)
    if inner:
        key = (*key, "batch-inner")
    example, check = probe_points(solve, x0, lay, k)
    return cached_trace(key, lambda: solve.step, example, check, invariant=(len(example) - 1,))(theta)


def probe_points(solve: Solve, x0: Tensor, lay: Callable, k: int) -> tuple[tuple, tuple]:
    """The trace's example point (ts[0], the state at x0, zero increments) and its check point (ts[k], a perturbed
    state, generic increments): t = ts[0] is often 0, where a term like k t x vanishes whatever k is."""
    ts, h, theta = solve.ts, solve.h, solve.theta
    n_inc = 2 if solve.levy else 1
    given = (solve.dW, solve.levy_area)[:n_inc] if solve.dW is not None else None
    probe = torch.ones(solve.wshape, dtype=x0.dtype, device=x0.device)
    w0 = tuple(v[0] for v in given) if given else (0 * probe,) * n_inc
    wk = tuple(v[k] for v in given) if given else (0.1 * probe, 0.05 * probe)[:n_inc]
    xk = x0 + 0.01 * lay(wk[0]) if solve.noise == "diagonal" else x0 + 0.01 * lay(_irregular(x0))
    y0 = solve.init(x0)
    yk = as_state(solve.init(lay(xk)))
    return (ts[0], h[0], *y0, *map(lay, w0), theta), (ts[k], h[k], *yk, *map(lay, wk), theta)


def solve_traced(solve: Solve) -> Tensor:
    """The traced loop (under no_grad): X at ts[-1] (B, d), or the path (N+1, B, d)."""
    N, ts, h = solve.N, solve.ts, solve.h
    with torch.no_grad():
        x0 = solve.x0.contiguous()       # an expanded x0 (one row for all paths) would reach the trace's in-place ops
        inner = False
        if solve.noise != "diagonal" and x0.device.type == "cpu":
            key = ("inner", solve.scheme, field_state(solve.f, solve.g, solve.dg)[0], *x0.shape, solve.noise, solve.m)
            inner = _inner_pays(key, solve, x0)
        xs = batch_inner(x0) if inner else x0
        run = double_buffered(traced_step(solve, xs, inner))   # results alternate between two sets of buffers
        chunks = ((tuple(batch_inner(v, 1) for v in w) for w in solve.chunks()) if inner else solve.chunks())
        path = torch.empty((N + 1, *x0.shape), dtype=x0.dtype, device=x0.device) if solve.save == "path" else None
        if path is not None:
            path[0].copy_(x0)
        ok = torch.ones((), dtype=torch.bool, device=x0.device)
        y, n, checked = solve.init(xs), 0, 0
        for w in chunks:
            c = w[0].shape[0]
            for t, hn, *wn in per_step(ts[n:n + c], h[n:n + c], *w):
                y = as_state(run(t, hn, *y, *wn))
                n += 1
                if path is not None:
                    path[n].copy_(y[0])
            if solve.check_finite and n - checked >= CHECK_EVERY:
                ok, checked = ok & torch.isfinite(y[0]).all(), n
        x = y[0]
        if solve.check_finite and not bool(ok & torch.isfinite(x).all()):
            solve.raise_non_finite(path)
        if path is not None:
            return path
        return x.contiguous() if inner else (x.clone() if x is x0 else x)


# --- batch-innermost storage -------------------------------------------------------------------------------------
def batch_inner(v: Tensor, batch_dim: int = 0) -> Tensor:
    """v with the same shape and values, stored with the batch axis innermost (stride 1), e.g. a (B, d) view of a
    contiguous (d, B) tensor; v itself if it holds one value per path.

    Why: with noise that is not diagonal the step multiplies (B, d, m) and (B, m) tensors broadcast against each
    other, and torch's elementwise kernels vectorise only along the innermost axis: stored batch-first that axis
    has d or m (3-4) entries and a broadcast one costs ~1-4 ns per element; batch-innermost it has B, at the
    speed of a plain elementwise op (~0.1-0.3 ns). Elementwise results do not depend on the storage order.
    """
    moved = v.movedim(batch_dim, -1)
    return v if moved.is_contiguous() else moved.contiguous().movedim(-1, batch_dim)


_INNER: OrderedDict[tuple, bool] = OrderedDict()


def _inner_pays(key: tuple, solve: Solve, x0: Tensor) -> bool:
    """Whether the traced loop may run batch-innermost for this key (decided once per key): the eager step, given
    every state and increment batch-innermost, runs and returns its state stored the same way (so every step sees
    the layout the trace was recorded on). A field that reshapes x with .view, or makes its output contiguous,
    keeps the usual layout."""
    ok = _INNER.get(key)
    if ok is None:
        def strides(v):
            return [st for st, n in zip(v.stride(), v.shape) if n > 1]
        try:
            point = probe_points(solve, batch_inner(x0), batch_inner, 1 if solve.N > 1 else 0)[1]
            outs = as_state(solve.step(*point))
            ok = all(o.shape == i.shape and strides(o) == strides(i) for o, i in zip(outs, point[2:-1]))
        except Exception:            # noqa: BLE001 - any failure means: keep the usual layout
            ok = False
        _INNER[key] = ok
        while len(_INNER) > 32:
            _INNER.popitem(last=False)
    return ok


@functools.lru_cache(maxsize=8)
def _irregular_field(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    k = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64, device=device).reshape(shape)
    return (k * 0.6180339887498949).frac().add(0.5).to(dtype)


def _irregular(x: Tensor) -> Tensor:
    """A fixed, irregular field in [0.5, 1.5) shaped like x (a generic probe direction; made once per shape)."""
    return _irregular_field(tuple(x.shape), x.dtype, x.device)
