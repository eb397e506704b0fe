"""The primal SDE solver: runs a scheme's one-step map (`schemes`) along a time grid.

One solver for every use. Diagonal noise, f(t, x, theta) and g(t, x, theta) both (B, d).
  - When a gradient is needed (x0 or theta requires grad under autograd, or a torch.func transform is
    active) it runs the step map eagerly and out of place, so backprop and finite differences
    differentiate exactly the map below.
  - Otherwise it runs the same map traced once into straight-line aten code (`_tracing`:
    f and g inlined, products fused into the sums that consume them, theta-only ops hoisted out of the
    loop); on small tensors a step costs the ops it launches, so this is the fast path. The path is
    preallocated and each step is copied into its slot.
  - Brownian increments, when not given, are drawn as standard normals in chunks of steps sized to stay
    in cache (`brownian.normal_chunks`), scaled by sqrt(|h|) once per chunk.
`compile=True` (or a torch.compile mode such as "reduce-overhead", CUDA graphs on GPU) instead compiles
the step map with torch.compile, which fuses a step's elementwise work into a few kernels; it pays off for
network drifts on large batches and for cheap fields on GPU, after a one-off compile of tens of seconds.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from ._tracing import cached_trace, field_state
from .brownian import normal_chunks
from .schemes import Field, check_inputs, step_map

__all__ = ["simulate", "per_step"]


def per_step(*seqs: Tensor, block: int = 256) -> Iterator[tuple[Tensor, ...]]:
    """(seqs[0][n], seqs[1][n], ...) for each step n, the sequences aligned on their first axis (zip's length).

    The per-step views are made `block` steps at a time: made all at once they cost ~0.7 kB per step, so a
    solve keeping only its end state would hold memory growing with N.
    """
    n = min(s.shape[0] for s in seqs)
    for start in range(0, n, block):
        yield from zip(*(s[start:start + block].unbind(0) for s in seqs))


def _needs_grad(*tensors: Tensor) -> bool:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(wrapped(v) or (torch.is_grad_enabled() and v.requires_grad) for v in tensors)


def simulate(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None = None,
             scheme: str = "euler", generator: torch.Generator | None = None, *, save: str = "end",
             dg: Field | None = None, compile: bool | str = False, trace: bool = True) -> Tensor:
    """The path of `scheme` on the grid ts: X at ts[-1] (B, d) with save="end", or the path (N+1, B, d).

    f(t, x, theta) -> (B, d) drift; g(t, x, theta) -> (B, d) diagonal diffusion (g_i may depend on x_i only).
    x0: (B, d); theta: (P,); ts: (N+1,) strictly monotone (decreasing for reverse-time solves).
    dW: (N, B, d) Brownian increments; if None they are drawn from `generator` as sqrt(|h_n|) z_n with z
    from `normal_chunks` (on the generator's device, then moved). scheme: "euler" (Ito), "milstein" (Ito;
    `dg(t, x, theta)` = dg_i/dx_i (B, d) replaces the JVP of g it otherwise takes), "heun" (Stratonovich).
    save: "end" (memory independent of N) or "path". Differentiable by autograd in x0 and theta (then the
    step map runs eagerly). trace=False runs the step map eagerly always; compile: False, True, or a
    torch.compile mode ("reduce-overhead" uses CUDA graphs on GPU), compiled once per (f, g, dg, mode).
    """
    check_inputs(f, g, x0, theta, ts, dW, scheme, save)
    N = ts.shape[0] - 1
    step = step_map(scheme, f, g, dg)
    h = ts[1:] - ts[:-1]
    fields, fields_need_grad = field_state(f, g, dg)
    grad = (_needs_grad(x0, theta, ts) or (dW is not None and _needs_grad(dW))
            or (fields_need_grad and torch.is_grad_enabled()))      # f or g read tensors that require grad
    if grad:
        if dW is None:
            dW = torch.cat(list(normal_chunks(N, tuple(x0.shape), generator, x0.dtype, x0.device))) * h.abs().sqrt()[:, None, None]
        x, xs = x0, [x0]
        for n in range(N):
            x = step(ts[n], h[n], x, dW[n], theta)
            if save == "path":
                xs.append(x)
        return torch.stack(xs) if save == "path" else x
    with torch.no_grad():
        if compile:
            run = _compiled(scheme, f, g, dg, compile)(theta)
        elif trace:
            k = 1 if N > 1 else 0
            dw0 = dW[0] if dW is not None else torch.zeros_like(x0)
            dwk = dW[k] if dW is not None else 0.1 * torch.ones_like(x0)
            key = ("simulate", scheme, fields, *x0.shape, theta.shape, x0.dtype, x0.device)
            run = cached_trace(key, lambda: step, (ts[0], h[0], x0, dw0, theta), (ts[k], h[k], x0 + 0.01 * dwk, dwk, theta),
                               invariant=(4,))(theta)
        else:
            run = lambda t, hn, x, dw: step(t, hn, x, dw, theta)
        if dW is None:
            chunks = normal_chunks(N, tuple(x0.shape), generator, x0.dtype, x0.device)
            scale = h.abs().sqrt()
        else:
            chunks, scale = iter([dW]), None
        path = torch.empty((N + 1, *x0.shape), dtype=x0.dtype, device=x0.device) if save == "path" else None
        if path is not None:
            path[0].copy_(x0)
        graphs = isinstance(compile, str) and "reduce-overhead" in compile
        x, n = x0, 0
        for z in chunks:
            c = z.shape[0]
            if scale is not None:
                z = z.mul_(scale[n:n + c, None, None])              # one op per chunk, not per step
            for t, hn, dw in per_step(ts[n:n + c], h[n:n + c], z):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                x = run(t, hn, x, dw)
                n += 1
                if path is not None:
                    path[n].copy_(x)
        return path if path is not None else (x.clone() if graphs or x is x0 else x)


_COMPILED: dict = {}


def _compiled(scheme: str, f: Field, g: Field, dg: Field | None, mode: bool | str) -> Callable:
    """bind(theta) -> step(t, h, x, dw): the scheme's step map compiled with torch.compile (cached)."""
    key = (scheme, f, g, dg, mode)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = torch.compile(step_map(scheme, f, g, dg), dynamic=False, **({} if mode is True else {"mode": mode}))
        _COMPILED[key] = fn
    return lambda theta: (lambda t, hn, x, dw: fn(t, hn, x, dw, theta))
