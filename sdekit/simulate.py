"""Fast primal SDE simulation: the Euler-Maruyama, Milstein and stochastic Heun paths in a lean loop.

The same discrete maps as `sdekit.sensitivity.schemes` (diagonal noise, f(t, x, theta) and
g(t, x, theta) both (B, d)), written for speed rather than differentiability:
  - the output path is preallocated and each step writes straight into its slot (no stack at the end);
  - updates are in place (`add(out=)`, `addcmul_`), into a buffer other than x so that f or g
    returning x itself (or a view of it) is never overwritten before it is read;
  - Brownian increments, when not given, are drawn as standard normals in chunks of steps sized to
    stay in cache, and the sqrt(|h|) scale is folded into the update's `addcmul_` coefficient;
  - times are unbound once, so a step costs the field calls plus 2-4 tensor ops.
`compile=True` (or a torch.compile mode such as "reduce-overhead", CUDA graphs on GPU) fuses one step
into one kernel with torch.compile; it pays off when f and g are cheap elementwise maps (e.g. GBM),
where the eager loop is memory-bound on 4-5 passes over x per step.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["simulate", "normal_chunks", "chunk_steps", "SIMULATE_SCHEMES"]

Field = Callable[[Tensor, Tensor, Tensor], Tensor]
SIMULATE_SCHEMES = ("euler", "milstein", "heun")
_CHUNK_ELEMENTS = 1 << 18   # ~1 MiB of float32 normals per draw: large enough to amortise the call, small enough for L2


def chunk_steps(shape: tuple[int, ...]) -> int:
    """How many steps of normals of `shape` (B, d) one draw covers."""
    return max(1, _CHUNK_ELEMENTS // max(1, math.prod(shape)))


def normal_chunks(steps: int, shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype,
                  device: torch.device | str) -> Iterator[Tensor]:
    """Standard normals for `steps` steps, yielded as (c, *shape) chunks of `chunk_steps(shape)` steps.

    This chunking is part of the definition of `simulate(dW=None)`: dW[n] = sqrt(|h_n|) z[n] where z is
    the concatenation of these chunks, so a seed gives the same path on every call.
    """
    c = chunk_steps(shape)
    gen_device = generator.device if generator is not None else torch.device(device)
    for start in range(0, steps, c):
        n = min(c, steps - start)
        z = torch.randn((n, *shape), generator=generator, dtype=dtype, device=gen_device)
        yield z.to(device, non_blocking=True)


def _milstein_gdg(g: Field, dg: Field | None, t: Tensor, x: Tensor, theta: Tensor, gx: Tensor) -> Tensor:
    """g_i dg_i/dx_i: from `dg` if given, else one forward-mode JVP of g along g (no functorch transform)."""
    if dg is not None:
        return gx * dg(t, x, theta)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = g(t, fwAD.make_dual(x, gx), theta)
        return fwAD.unpack_dual(out).tangent


def _eager_step(scheme: str, f: Field, g: Field, dg: Field | None):
    """step(t, t_next, h, x, theta, z, scale, habs, out) -> out, where dW = scale * z."""
    if scheme == "euler":
        def step(t, t1, h, x, theta, z, scale, habs, out):
            fx, gx = f(t, x, theta), g(t, x, theta)
            torch.add(x, fx, alpha=h, out=out)
            return out.addcmul_(gx, z, value=scale)
    elif scheme == "milstein":
        def step(t, t1, h, x, theta, z, scale, habs, out):
            fx, gx = f(t, x, theta), g(t, x, theta)
            gdg = _milstein_gdg(g, dg, t, x, theta, gx)
            torch.add(x, fx, alpha=h, out=out)
            out.addcmul_(gx, z, value=scale)
            # 1/2 g g' (dW^2 - |h|) = 1/2 g g' (scale^2 z^2 - |h|)
            return out.addcmul_(gdg, z * z * (scale * scale) - habs, value=0.5)
    elif scheme == "heun":
        def step(t, t1, h, x, theta, z, scale, habs, out):
            f0, g0 = f(t, x, theta), g(t, x, theta)
            x_pred = torch.add(x, f0, alpha=h).addcmul_(g0, z, value=scale)
            f1, g1 = f(t1, x_pred, theta), g(t1, x_pred, theta)
            torch.add(x, f0 + f1, alpha=0.5 * h, out=out)
            return out.addcmul_(g0 + g1, z, value=0.5 * scale)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SIMULATE_SCHEMES}")
    return step


def _functional_step(scheme: str, f: Field, g: Field, dg: Field | None):
    """The same maps out of place (what torch.compile traces best): step(t, t1, h, x, theta, z, scale, habs) -> x'."""
    def step(t, t1, h, x, theta, z, scale, habs):
        fx, gx = f(t, x, theta), g(t, x, theta)
        if scheme == "euler":
            return x + fx * h + gx * (z * scale)
        if scheme == "milstein":
            gdg = gx * dg(t, x, theta) if dg is not None else torch.func.jvp(lambda y: g(t, y, theta), (x,), (gx,))[1]
            return x + fx * h + gx * (z * scale) + 0.5 * gdg * (z * z * (scale * scale) - habs)
        x_pred = x + fx * h + gx * (z * scale)
        return x + 0.5 * (fx + f(t1, x_pred, theta)) * h + 0.5 * (gx + g(t1, x_pred, theta)) * (z * scale)
    return step


def simulate(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None = None,
             scheme: str = "euler", generator: torch.Generator | None = None, *, save: str = "end",
             dg: Field | None = None, compile: bool | str = False) -> Tensor:
    """The primal path of `scheme` on the grid ts, without autograd: X at ts[-1] (B, d), or the path (N+1, B, d).

    f(t, x, theta) -> (B, d) drift; g(t, x, theta) -> (B, d) diagonal diffusion (g_i may depend on x_i only).
    x0: (B, d); theta: (P,) (any tensor f and g accept); ts: (N+1,) strictly monotone.
    dW: (N, B, d) Brownian increments; if None they are drawn from `generator` as sqrt(|h_n|) z_n with z
    from `normal_chunks` (on the generator's device, then moved). scheme: "euler" (Ito), "milstein" (Ito;
    `dg(t, x, theta)` = dg_i/dx_i (B, d) skips the JVP it otherwise takes), "heun" (Stratonovich).
    save: "end" (memory independent of N) or "path". compile: False, True, or a torch.compile mode
    ("reduce-overhead" uses CUDA graphs on GPU); the compiled step is traced once per (f, g, shape).
    Equal, to round-off, to `sdekit.sensitivity.solve` on the same increments (tests/test_fast_paths.py).
    """
    if scheme not in SIMULATE_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SIMULATE_SCHEMES}")
    if save not in ("end", "path"):
        raise ValueError(f"unknown save {save!r}; expected 'end' or 'path'")
    if x0.ndim != 2:
        raise ValueError(f"x0 must be (B, d), got shape {tuple(x0.shape)}")
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be (N+1,) with N >= 1, got shape {tuple(ts.shape)}")
    N = ts.shape[0] - 1
    if dW is not None and dW.shape != (N, *x0.shape):
        raise ValueError(f"dW must be (N, B, d) = ({N}, {x0.shape[0]}, {x0.shape[1]}), got {tuple(dW.shape)}")
    with torch.no_grad():
        return _simulate(f, g, x0, theta, ts, dW, scheme, generator, save, dg, compile)


def _compiled(scheme, f, g, dg, mode):
    key = (scheme, f, g, dg, mode)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = torch.compile(_functional_step(scheme, f, g, dg), dynamic=False,
                           **({} if mode is True else {"mode": mode}))
        _COMPILED[key] = fn
    return fn


_COMPILED: dict = {}


def _simulate(f, g, x0, theta, ts, dW, scheme, generator, save, dg, compile):
    N = ts.shape[0] - 1
    t_list = ts.unbind(0)
    h_list = (ts[1:] - ts[:-1]).tolist()
    if dW is None:
        scales = [math.sqrt(abs(h)) for h in h_list]
        noise = normal_chunks(N, tuple(x0.shape), generator, x0.dtype, x0.device)
    else:
        scales = [1.0] * N                       # given increments are used as they are
        noise = iter([dW])
    path = torch.empty((N + 1, *x0.shape), dtype=x0.dtype, device=x0.device) if save == "path" else None
    if path is not None:
        path[0].copy_(x0)
    x = x0
    if compile:
        step = _compiled(scheme, f, g, dg, compile)
        # step sizes as 0-d tensors: a Python float would be specialised and retraced for every distinct value
        hs = (ts[1:] - ts[:-1]).to(x0.dtype)
        h_t, habs_t = hs.unbind(0), hs.abs().unbind(0)
        scale_t = (hs.abs().sqrt() if dW is None else torch.ones_like(hs)).unbind(0)
        graphs = isinstance(compile, str) and "reduce-overhead" in compile
        n = 0
        for z_chunk in noise:
            for z in z_chunk.unbind(0):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                x = step(t_list[n], t_list[n + 1], h_t[n], x, theta, z, scale_t[n], habs_t[n])
                if path is not None:
                    path[n + 1].copy_(x)
                n += 1
        return path if path is not None else x.clone()
    step = _eager_step(scheme, f, g, dg)
    bufs = [torch.empty_like(x0), torch.empty_like(x0)]   # ping-pong when only the end is kept
    n = 0
    for z_chunk in noise:
        for z in z_chunk.unbind(0):
            out = path[n + 1] if path is not None else bufs[n % 2]
            x = step(t_list[n], t_list[n + 1], h_list[n], x, theta, z, scales[n], abs(h_list[n]), out)
            n += 1
    return path if path is not None else x
