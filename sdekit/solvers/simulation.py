"""The primal SDE solver: runs a scheme's one-step map (`schemes`) along a time grid.

One solver for every use and noise type (diagonal by default: f(t, x, theta) and g(t, x, theta) both (B, d)).
  - When a gradient is needed (x0 or theta requires grad under autograd, or a torch.func transform is
    active) it runs the step map eagerly and out of place, so backprop and finite differences
    differentiate exactly the map below.
  - Otherwise it runs the same map traced once into straight-line aten code (`_tracing`:
    f and g inlined, products fused into the sums that consume them, theta-only ops hoisted out of the
    loop); on small tensors a step costs the ops it launches, so this is the fast path. The path is
    preallocated and each step is copied into its slot.
  - With noise other than diagonal (on the CPU) the traced loop stores x, the scheme's state and the increments
    batch-innermost (`_batch_inner`: a (B, d) view of a (d, B) tensor), so that the (B, d, m) x (B, m) products
    vectorise over the batch instead of over d or m; results do not depend on the storage, and the returned x is
    batch-first as always. A field that needs batch-first storage (a .view that flattens x) keeps it.
  - Brownian increments, when not given, are drawn as standard normals in chunks of steps sized to stay
    in cache (`brownian.normal_chunks`), scaled by sqrt(|h|) once per chunk.
  - A scheme's state may be more than x (reversible_heun carries (x, z, f, g)); the state is made by the
    scheme's `init` at (ts[0], x0) and x, its first entry, is what the solve returns and saves.
`compile=True` (or a torch.compile mode such as "reduce-overhead", CUDA graphs on GPU) instead compiles
the step map with torch.compile. Except under CUDA graphs, `BLOCK` = 8 steps are unrolled into one compiled call,
so that their elementwise work fuses into one pass over the state per block (a cheap field's solve then costs
little more than drawing its normals, which are drawn in place into the block's buffer); the last steps of a solve
that do not fill a block run one per call. After a one-off compile of seconds to tens of seconds it pays off for
cheap fields on large batches (on CPU a network drift ran slower compiled than traced: inductor's tanh is slower
than torch's there); not yet measured on a GPU.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Callable, Iterator

import torch
from torch import Tensor

from ._tracing import _allclose, cached_trace, double_buffered, field_state
from .adaptive import check_scheme, integrate_adaptive
from .brownian import chunk_steps, normal_chunks
from .brownian_path import path_chunks, resolve_path
from .schemes import Field, check_inputs, get_scheme, init_state, step_map
from .schemes import check_finite as _check_finite

__all__ = ["simulate", "per_step"]


def per_step(*seqs: Tensor, block: int = 256) -> Iterator[tuple[Tensor, ...]]:
    """`(seqs[0][n], seqs[1][n], ...)` for each step n, the sequences aligned on their first axis (zip's length).

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
             scheme: str = "euler", generator: torch.Generator | None = None, *, noise: str = "diagonal",
             levy_area: Tensor | None = None, save: str = "end", dg: Field | None = None, compile: bool | str = False,
             trace: bool = True, check_finite: bool = True, bm=None, adaptive: bool = False, rtol: float = 1e-3,
             atol: float = 1e-6, dt0: float | None = None, dt_min: float | None = None, max_steps: int = 100_000,
             return_info: bool = False) -> Tensor | tuple[Tensor, dict]:
    """The path of `scheme` on the grid ts: X at ts[-1] (B, d) with save="end", or the path (N+1, B, d).

    f(t, x, theta) -> (B, d) drift; g(t, x, theta) the diffusion, shaped by `noise` (torchsde's noise types):
        "diagonal" (default)  g -> (B, d),     dW (N, B, d)   (g_i may depend on x_i only)
        "scalar"              g -> (B, d, 1),  dW (N, B, 1)
        "additive"            g -> (B, d, m),  dW (N, B, m)   (g does not depend on x)
        "general"             g -> (B, d, m),  dW (N, B, m)
    x0: (B, d); theta: (P,); ts: (N+1,) strictly monotone (decreasing for reverse-time solves).
    scheme, with the calculus it solves in and its strong order per noise type (diagonal/scalar/additive/general):
        "euler"            Ito            0.5 / 0.5 / 1.0 / 0.5
        "milstein"         Ito            1.0 / 1.0 / 1.0 / -      dg(t, x, theta) = dg_i/dx_i (B, d) replaces
                                                                   its JVP of g on diagonal noise
        "srk"              Ito            1.5 / 1.5 / 1.5 / -      reads the space-time Levy area of every step
        "euler_heun", "heun", "midpoint", "reversible_heun"
                           Stratonovich   1.0 / 1.0 / 1.0 / 0.5
    (`sdekit.solvers.schemes`; a Stratonovich scheme solves an Ito SDE given `ito_to_stratonovich(f, g, noise)`).
    dW: (N, B, m) Brownian increments over the steps (on decreasing grids those of the reverse-time motion); if
    None they are drawn from `generator` as sqrt(|h_n|) z_n with z from `normal_chunks` (on the generator's device,
    then moved), the same increments for every scheme and seed. levy_area: (N, B, m) the steps' space-time Levy
    areas H (N(0, |h|/12), independent of dW; torchsde's U is |h| (dW/2 + H)), which srk needs with a given dW;
    when srk draws its own noise, H_n = sqrt(|h_n|/12) z'_n with z' the chunks drawn after all of z (as
    `BrownianGrid.draw(..., levy_area=True)`), made without holding z.
    save: "end" (memory independent of N) or "path". Differentiable by autograd in x0 and theta (then the
    step map runs eagerly). trace=False runs the step map eagerly always; compile: False, True, or a
    torch.compile mode ("reduce-overhead" uses CUDA graphs on GPU), compiled once per (f, g, dg, mode): BLOCK = 8
    steps per compiled call (one step per call under CUDA graphs), torch.compile's guards recompiling when what the
    fields read changes; the first compiled block (or step) of every solve is compared with the eager steps, and
    compiled code that disagrees is a RuntimeError.
    Non-finite x0, theta, ts, dW or levy_area are a ValueError naming the argument and the first bad index; a
    solution that becomes non-finite is a FloatingPointError naming the step, its times and the sample
    (a flag accumulated on the device every few steps, read once per solve). dW and levy_area are scanned
    only then (a NaN increment makes the path non-finite), so given increments cost no extra pass.
    check_finite=False returns the result as it is, unchecked.

    bm: a Brownian path (N(0, 1) per unit time, shape (B, m)) instead of dW: sdekit's BrownianGrid or
    VirtualBrownianTree, or torchsde's BrownianInterval / BrownianTree (levy_area_approximation="space-time" for
    srk). The steps read their increments (and srk its Levy areas) from it, so solves on a grid and on any
    refinement of it see the same Brownian motion. On a decreasing grid step n reads dW = W(t_{n+1}) - W(t_n)
    = -bm(t_{n+1}, t_n). bm with dW=, levy_area= or generator= is an error.
    adaptive=True: steps chosen by step doubling (`solvers.adaptive`) to keep the scaled local error under
    rtol/atol, starting from dt0 (default |ts[-1] - ts[0]| / 100), landing on every time of ts; the path must
    answer any time (not a BrownianGrid). Euler is refused unless the noise is additive (its adaptive solution
    converges to a wrong limit; milstein, srk, heun, midpoint do not). Without bm a VirtualBrownianTree is drawn
    from generator (returned as info["bm"]); with dW= it is an error. dt_min (default 1e-10 of the span): the
    shortest step, accepted even above tolerance (counted in info["dt_min_steps"], with a RuntimeWarning);
    max_steps: attempts before a RuntimeError.
    return_info=True returns (X, info): info["accepted"], ["rejected"] steps and ["step_evaluations"] (scheme
    steps taken: N on a fixed grid, 3 per attempt when adaptive), and when adaptive ["dt_min_steps"],
    ["t_accepted"] (the accepted steps' end times, float64) and ["bm"] (the path read).
    """
    sch = get_scheme(scheme)
    # dW and levy_area are checked for NaN/inf only if the path turns out non-finite (a NaN increment makes it so)
    m = check_inputs(f, g, x0, theta, ts, dW, scheme, save, noise=noise, levy_area=levy_area, finite_increments=False)
    bpath = resolve_path(bm, adaptive=adaptive, dW=dW, levy_area=levy_area, generator=generator, ts=ts,
                         shape=(x0.shape[0], m), dtype=x0.dtype, device=x0.device, noise=noise,
                         levy=sch.needs_levy_area, scheme=scheme)
    if adaptive:
        check_scheme(scheme, noise)
    finish = (lambda out: (out, {"accepted": N, "rejected": 0, "step_evaluations": N})) if return_info else (lambda out: out)
    levy = sch.needs_levy_area
    if levy and dW is not None and levy_area is None:
        raise ValueError(f"scheme {scheme!r} reads the space-time Levy area of every step, which dW alone does not "
                         f"carry: pass levy_area= (N, B, m), H = U/|h| - dW/2 in torchsde's terms, N(0, |h|/12) and "
                         f"independent of dW; or neither dW nor levy_area, to draw both from generator")
    if levy_area is not None and dW is None:
        raise ValueError("levy_area= goes with dW= (the increments it belongs to); without dW both are drawn")
    N = ts.shape[0] - 1
    wshape = (x0.shape[0], m)
    step = step_map(scheme, f, g, dg, noise=noise)
    h = ts[1:] - ts[:-1]
    fields, fields_need_grad = field_state(f, g, dg)
    grad = (_needs_grad(x0, theta, ts) or any(v is not None and _needs_grad(v) for v in (dW, levy_area))
            or (fields_need_grad and torch.is_grad_enabled()))      # f or g read tensors that require grad
    gen = generator if generator is not None else _default_generator(x0.device)
    gen_state = gen.get_state() if dW is None and gen is not None and check_finite else None
    given = (dW,) if not levy else (dW, levy_area)

    def noise_chunks():
        if bpath is not None:
            return path_chunks(bpath, ts, levy, chunk_steps(wshape))
        if dW is not None:
            return (tuple(v[i:i + _GIVEN_CHUNK] for v in given) for i in range(0, N, _GIVEN_CHUNK))
        return _drawn_chunks(N, wshape, gen, x0.dtype, x0.device, h, levy)

    adaptive_opts = dict(rtol=rtol, atol=atol, dt0=dt0, dt_min=dt_min, max_steps=max_steps, save=save,
                         return_info=return_info)
    if grad:
        if adaptive:
            return _adaptive(lambda t, hn, *a: step(t, hn, *a, theta), sch, f, g, ts, x0, theta, noise, scheme, bpath,
                             **adaptive_opts)
        incs = given if dW is not None else tuple(torch.cat(v) for v in zip(*noise_chunks()))
        y = init_state(scheme, f, g, ts[0], x0, theta, noise=noise)
        x, xs, flags = x0, [x0], []
        for n in range(N):
            w = tuple(v[n] for v in incs)
            if sch.stateful:
                y = step(ts[n], h[n], *y, *w, theta)
                x = y[0]
            else:
                y = x = step(ts[n], h[n], x, *w, theta)
            if save == "path":
                xs.append(x)
            if check_finite and not _transformed():
                flags.append(torch.isfinite(x.detach()).all())
        if flags and not bool(torch.stack(flags).all()):
            _check_given(dW, levy_area)
            with torch.no_grad():
                n = int((~torch.stack(flags)).nonzero()[0])
                prev = xs[n] if save == "path" else None
                _raise_non_finite(ts, n, N, _first_bad(_rerun_to(step, sch, f, g, ts, h, x0, theta, incs, n, noise, scheme)), prev)
        return finish(torch.stack(xs) if save == "path" else x)
    with torch.no_grad():
        x0 = x0.contiguous()             # an expanded x0 (one row for all paths) would reach the trace's in-place ops
        inner, x_start = False, x0       # inner: the traced loop runs on states stored batch-innermost (`_batch_inner`)
        if compile:
            run = _compiled(scheme, f, g, dg, compile, noise)(theta)
        elif trace:
            k = 1 if N > 1 else 0
            key = ("simulate", scheme, fields, *x0.shape, theta.shape, x0.dtype, x0.device)
            if noise != "diagonal":
                key = (*key, noise, m)
            zero, probe = torch.zeros(wshape, dtype=x0.dtype, device=x0.device), torch.ones(wshape, dtype=x0.dtype, device=x0.device)
            w0 = tuple(v[0] for v in given) if dW is not None else (zero, zero)[:len(given)]
            wk = tuple(v[k] for v in given) if dW is not None else (0.1 * probe, 0.05 * probe)[:len(given)]

            def points(x0, lay=lambda v: v):
                xk = x0 + 0.01 * lay(wk[0]) if noise == "diagonal" else x0 + 0.01 * lay(_irregular(x0))
                y0 = init_state(scheme, f, g, ts[0], x0, theta, noise=noise)
                yk = init_state(scheme, f, g, ts[k], lay(xk), theta, noise=noise)
                state0 = y0 if sch.stateful else (y0,)          # x0 laid out; the fields lay out the rest
                statek = yk if sch.stateful else (yk,)
                return (ts[0], h[0], *state0, *map(lay, w0), theta), (ts[k], h[k], *statek, *map(lay, wk), theta)
            if noise != "diagonal" and x0.device.type == "cpu" and not adaptive and _inner_pays(key, step, lambda: points(_batch_inner(x0), _batch_inner)[1]):
                x0, inner = _batch_inner(x0), True
                key = (*key, "batch-inner")
            example, check = points(x0, _batch_inner if inner else (lambda v: v))
            run = cached_trace(key, lambda: step, example, check, invariant=(len(example) - 1,))(theta)
        else:
            run = lambda t, hn, *a: step(t, hn, *a, theta)          # noqa: E731
        if adaptive:
            return _adaptive(run, sch, f, g, ts, x0, theta, noise, scheme, bpath, **adaptive_opts)
        path = torch.empty((N + 1, *x0.shape), dtype=x0.dtype, device=x0.device) if save == "path" else None
        if path is not None:
            path[0].copy_(x0)
        graphs = isinstance(compile, str) and "reduce-overhead" in compile
        ok = torch.ones((), dtype=torch.bool, device=x0.device) if check_finite else None
        x, n, checked = x0, 0, 0
        chunks = noise_chunks
        if not graphs:
            run = double_buffered(run)   # the traced step writes its results into two alternating sets of buffers
        if inner:
            chunks = lambda: (tuple(_batch_inner(v, 1) for v in w) for w in noise_chunks())   # noqa: E731
        if compile and not graphs:
            # BLOCK steps per compiled call: one generated loop reads x once and writes it once per block
            c = chunk_steps(wshape)
            k = BLOCK if c >= BLOCK else c * -(-BLOCK // c)           # several whole chunks when a chunk is short
            buf = None
            if c < k and dW is None and bpath is None and not levy and (gen is None or gen.device == x0.device):
                buf = torch.empty((k, *wshape), dtype=x0.dtype, device=x0.device)       # drawn where the block reads it
                chunks = lambda: _drawn_chunks(N, wshape, gen, x0.dtype, x0.device, h, levy, out=buf)   # noqa: E731
            n_state = len(sch.state_names) if sch.stateful else 1
            block = _compiled_block(scheme, f, g, dg, compile, noise, n_state, k, path is not None)(theta)
            y = init_state(scheme, f, g, ts[0], x0, theta, noise=noise) if sch.stateful else (x0,)
            verified = False
            for w in _blocks(chunks(), k, None if buf is None else (buf,)):
                if w[0].shape[0] == k:
                    y_in, y = y, block(ts[n:n + k], h[n:n + k], *y, *w)
                    if not verified:         # the first block of every solve against the eager steps
                        _check_compiled(step, theta, ts[n:n + k], h[n:n + k], y_in, w, y[:n_state], scheme)
                        verified = True
                    if path is not None:
                        y, xs = y[:n_state], y[n_state]
                        path[n + 1:n + k + 1].copy_(xs)
                    n += k
                else:                                                 # the last few steps
                    for t, hn, *wn in per_step(ts[n:], h[n:], *w):
                        y_in, y = y, run(t, hn, *y, *wn)
                        y = y if sch.stateful else (y,)
                        if not verified:
                            _check_compiled(step, theta, ts[n:n + 1], h[n:n + 1], y_in, tuple(v[None] for v in wn), y, scheme)
                            verified = True
                        n += 1
                        if path is not None:
                            path[n].copy_(y[0])
                if ok is not None and n - checked >= _CHECK_EVERY:
                    ok, checked = ok & torch.isfinite(y[0]).all(), n
            x = y[0]
        elif sch.stateful:
            y = init_state(scheme, f, g, ts[0], x0, theta, noise=noise)
            for w in chunks():
                c = w[0].shape[0]
                for t, hn, *wn in per_step(ts[n:n + c], h[n:n + c], *w):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    y = run(t, hn, *y, *wn)
                    n += 1
                    if path is not None:
                        path[n].copy_(y[0])
                x = y[0]
                if ok is not None and n - checked >= _CHECK_EVERY:
                    ok, checked = ok & torch.isfinite(x).all(), n
        elif levy:
            for dw_c, H_c in chunks():
                c = dw_c.shape[0]
                for t, hn, dw, H in per_step(ts[n:n + c], h[n:n + c], dw_c, H_c):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    x = run(t, hn, x, dw, H)
                    n += 1
                    if path is not None:
                        path[n].copy_(x)
                if ok is not None and n - checked >= _CHECK_EVERY:
                    ok, checked = ok & torch.isfinite(x).all(), n
        else:
            for (z,) in chunks():
                c = z.shape[0]
                for t, hn, dw in per_step(ts[n:n + c], h[n:n + c], z):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    x = run(t, hn, x, dw)
                    n += 1
                    if path is not None:
                        path[n].copy_(x)
                if ok is not None and n - checked >= _CHECK_EVERY:
                    ok, checked = ok & torch.isfinite(x).all(), n
        if ok is not None and not bool(ok & torch.isfinite(x).all()):
            read = tuple(torch.cat(v) for v in zip(*noise_chunks())) if bpath is not None else None   # the path again
            _locate_non_finite(step, sch, f, g, ts, h, x_start, theta, noise, scheme, path, given if dW is not None else read,
                               gen, gen_state, N, wshape, levy)
        return finish(path if path is not None else x.contiguous() if inner else (x.clone() if graphs or x is x0 else x))


def _adaptive(run: Callable, sch, f: Field, g: Field, ts: Tensor, x0: Tensor, theta: Tensor, noise: str, scheme: str,
              bpath, *, rtol, atol, dt0, dt_min, max_steps, save, return_info):
    """simulate(adaptive=True): `run(t, h, *state, dW, [H])` (traced, compiled or eager) driven by step doubling."""
    levy = sch.needs_levy_area

    def one(t, hn, y, dw, H):
        return run(t, hn, *(y if sch.stateful else (y,)), *((dw, H) if levy else (dw,)))
    y0 = init_state(scheme, f, g, ts[0], x0, theta, noise=noise)
    x, info = integrate_adaptive(one, y0, ts, bpath, order=sch.order(noise), levy=levy, rtol=rtol, atol=atol, dt0=dt0,
                                 dt_min=dt_min, max_steps=max_steps, save=save)
    info["bm"] = bpath
    return (x, info) if return_info else x


_GIVEN_CHUNK = 256      # given increments are walked in views of this many steps
_CHECK_EVERY = 64       # steps between the on-device finiteness checks of the state (one op per check, no sync)


def _batch_inner(v: Tensor, batch_dim: int = 0) -> Tensor:
    """v with the same shape and values, stored with the batch axis innermost (stride 1), e.g. a (B, d) view of a
    contiguous (d, B) tensor; v itself if it holds one value per path.

    Why: with noise that is not diagonal the step multiplies (B, d, m) and (B, m) tensors broadcast against each
    other, and torch's elementwise kernels vectorise only along the innermost axis: stored batch-first that axis
    has d or m (3-4) entries and a broadcast one costs ~1-4 ns per element; batch-innermost it has B, at the
    speed of a plain elementwise op (~0.1-0.3 ns). Elementwise results do not depend on the storage order.
    """
    moved = v.movedim(batch_dim, -1)
    return v if moved.is_contiguous() else moved.contiguous().movedim(-1, batch_dim)


_INNER: "OrderedDict[tuple, bool]" = OrderedDict()


def _inner_pays(key: tuple, step: Callable, make_point: Callable[[], tuple]) -> bool:
    """Whether the traced loop may run batch-innermost for this trace key (decided once per key): the eager step,
    given every state and increment batch-innermost (`make_point()`, made only then), runs and returns its state
    stored the same way (so every step sees the layout the trace was recorded on). A field that reshapes x with
    .view, or makes its output contiguous, keeps the usual layout."""
    ok = _INNER.get(key)
    if ok is None:
        def strides(v):
            return [st for st, n in zip(v.stride(), v.shape) if n > 1]
        try:
            point = make_point()
            out = step(*point)
            outs = out if isinstance(out, tuple) else (out,)
            ok = all(o.shape == i.shape and strides(o) == strides(i) for o, i in zip(outs, point[2:-1]))
        except Exception:            # noqa: BLE001 - any failure means: keep the usual layout
            ok = False
        _INNER[key] = ok
        while len(_INNER) > 32:
            _INNER.popitem(last=False)
    return ok


def _transformed() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


@functools.lru_cache(maxsize=8)
def _irregular_field(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    k = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64, device=device).reshape(shape)
    return (k * 0.6180339887498949).frac().add(0.5).to(dtype)


def _irregular(x: Tensor) -> Tensor:
    """A fixed, irregular field in [0.5, 1.5) shaped like x (a generic probe direction; made once per shape, read
    only: every solve's trace check uses it)."""
    return _irregular_field(tuple(x.shape), x.dtype, x.device)


def _default_generator(device: torch.device) -> torch.Generator | None:
    """The generator torch.randn(device=device) draws from when given none (so its state can be saved and forked)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


def _drawn_chunks(N: int, shape: tuple[int, int], gen: torch.Generator | None, dtype: torch.dtype,
                  device: torch.device, h: Tensor, levy: bool, out: Tensor | None = None) -> Iterator[tuple[Tensor, ...]]:
    """(dW,) or (dW, H) chunks of steps: dW = sqrt(|h|) z, z the chunks of `normal_chunks`, and H = sqrt(|h|/12) z'
    with z' the chunks drawn after all of z. z' comes from a copy of the generator moved past the z draws (drawn
    and dropped chunk by chunk, so memory stays one chunk); the generator ends where a draw of z then z' leaves it.
    out (without Levy areas): the buffer dW is drawn into, as `normal_chunks(out=)`."""
    scale = h.abs().sqrt()
    n = 0
    if not levy:
        for z in normal_chunks(N, shape, gen, dtype, device, out=out):
            c = z.shape[0]
            yield (z.mul_(scale[n:n + c, None, None]),)              # one op per chunk, not per step
            n += c
        return
    hscale = (h.abs() / 12).sqrt()
    if gen is None:                                                   # no generator to fork: hold all of z
        zs = list(normal_chunks(N, shape, gen, dtype, device))
        ahead_chunks = normal_chunks(N, shape, gen, dtype, device)
        z_chunks = iter(zs)
    else:
        ahead = torch.Generator(device=gen.device)
        ahead.set_state(gen.get_state())
        for _ in normal_chunks(N, shape, ahead, dtype, device):
            pass
        z_chunks, ahead_chunks = normal_chunks(N, shape, gen, dtype, device), normal_chunks(N, shape, ahead, dtype, device)
    for z, zh in zip(z_chunks, ahead_chunks):
        c = z.shape[0]
        yield z.mul_(scale[n:n + c, None, None]), zh.mul_(hscale[n:n + c, None, None])
        n += c
    if gen is not None:
        gen.set_state(ahead.get_state())


def _check_given(dW: Tensor | None, levy_area: Tensor | None = None) -> None:
    for name, v in (("dW", dW), ("levy_area", levy_area)):
        if v is not None:
            _check_finite(name, v)


def _first_bad(x: Tensor) -> tuple[int, int, float]:
    b, i = (int(v) for v in (~torch.isfinite(x)).nonzero()[0])
    return b, i, float(x[b, i])


def _raise_non_finite(ts: Tensor, n: int, N: int, bad: tuple[int, int, float], prev: Tensor | None) -> None:
    b, i, val = bad
    before = "" if prev is None else f"; at ts[{n}] it was {float(prev[b, i]):.6g}"
    raise FloatingPointError(
        f"the solution became non-finite at step {n} of {N} (from t = {float(ts[n]):.6g} to t = {float(ts[n + 1]):.6g}): "
        f"x[{b}, {i}] = {val}{before}. A finer grid, or a drift and diffusion that stay finite, may help; "
        "check_finite=False returns the path as it is")


def _rerun_to(step, sch, f, g, ts, h, x0, theta, incs, n_bad, noise, scheme) -> Tensor:
    """The state after step n_bad, recomputed from x0 (eagerly, with the same increments)."""
    y = init_state(scheme, f, g, ts[0], x0.detach(), theta.detach(), noise=noise)
    k = n_bad + 1
    y, _ = _run_steps(step, ts[:k], h[:k], y if sch.stateful else (y,), tuple(v[:k].detach() for v in incs), theta.detach())
    return y[0]


def _locate_non_finite(step, sch, f, g, ts, h, x0, theta, noise, scheme, path, given, gen, gen_state, N, wshape, levy):
    """Find the first step whose state is non-finite (after a solve's flag said one is) and raise."""
    if given is not None:
        _check_given(*given)
    if path is not None:
        finite = torch.isfinite(path.reshape(N + 1, -1)).all(1)
        n = int((~finite).nonzero()[0]) - 1
        _raise_non_finite(ts, n, N, _first_bad(path[n + 1]), path[n])
    if given is None:                    # redraw the same increments: the generator as it was at the start
        if gen is None or gen_state is None:
            raise FloatingPointError(f"the solution became non-finite in a solve of {N} steps (from t = {float(ts[0]):.6g} "
                                     f"to {float(ts[-1]):.6g}); pass dW or a generator to have the step named")
        end_state = gen.get_state()
        gen.set_state(gen_state)
        chunks = _drawn_chunks(N, wshape, gen, x0.dtype, x0.device, h, levy)
    else:
        chunks = (tuple(v[i:i + _GIVEN_CHUNK] for v in given) for i in range(0, N, _GIVEN_CHUNK))
    try:
        y = init_state(scheme, f, g, ts[0], x0, theta, noise=noise)
        n = 0
        for w in chunks:
            for wn in zip(*w):
                prev = y[0] if sch.stateful else y
                y = step(ts[n], h[n], *(y if sch.stateful else (y,)), *wn, theta)
                x = y[0] if sch.stateful else y
                if not bool(torch.isfinite(x).all()):
                    _raise_non_finite(ts, n, N, _first_bad(x), prev)
                n += 1
    finally:
        if given is None:
            gen.set_state(end_state)
    raise FloatingPointError(f"the solution became non-finite in a solve of {N} steps, but not when recomputed eagerly "
                             "(the traced step and the eager one disagree there)")


_COMPILED: dict = {}
BLOCK = 8   # steps per compiled call of `simulate(compile=...)` (not under CUDA graphs)


def _compiled(scheme: str, f: Field, g: Field, dg: Field | None, mode: bool | str, noise: str = "diagonal") -> Callable:
    """bind(theta) -> step(t, h, *state, *increments): the scheme's step map compiled with torch.compile (cached)."""
    return _compile_cached((scheme, f, g, dg, mode, noise), lambda: step_map(scheme, f, g, dg, noise=noise), mode)


def _compile_cached(key: tuple, make_fn: Callable[[], Callable], mode: bool | str) -> Callable:
    """bind(theta) -> fn(t, h, *a) = compiled(t, h, *a, theta), compiled once per key with torch.compile."""
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(make_fn(), dynamic=False, **({} if mode is True else {"mode": mode}))
    return lambda theta: (lambda t, hn, *a: fn(t, hn, *a, theta))


def _run_steps(step: Callable, ts: Tensor, h: Tensor, y: tuple, ws: tuple, theta: Tensor) -> tuple[tuple, list]:
    """(state, [x after each step]) after the len(ts) steps of `step` from state y, step i reading ws[j][i]."""
    xs = []
    for i in range(ts.shape[0]):
        out = step(ts[i], h[i], *y, *(w[i] for w in ws), theta)
        y = out if isinstance(out, tuple) else (out,)
        xs.append(y[0])
    return y, xs


def _blocks(chunks: Iterator[tuple[Tensor, ...]], k: int, buf: tuple[Tensor, ...] | None = None
            ) -> Iterator[tuple[Tensor, ...]]:
    """The increments of `chunks` (tuples of (c, B, m) tensors, c varying) regrouped into tuples of exactly k steps
    (the last may have fewer): views of a chunk where it holds the k steps, else copies into one reused buffer
    (valid until the next tuple is taken; `buf`, (k, B, m) each, if given: steps already in place are not copied)."""
    fill = 0
    for w in chunks:
        c, i = w[0].shape[0], 0
        while i < c:
            if fill == 0 and c - i >= k:
                yield tuple(v[i:i + k] for v in w)
                i += k
                continue
            if buf is None:
                buf = tuple(v.new_empty((k, *v.shape[1:])) for v in w)
            n = min(k - fill, c - i)
            for b, v in zip(buf, w):
                if b[fill].data_ptr() != v[i].data_ptr():
                    b[fill:fill + n].copy_(v[i:i + n])
            fill, i = fill + n, i + n
            if fill == k:
                yield buf
                fill = 0
    if fill:
        yield tuple(b[:fill] for b in buf)


def _check_compiled(step: Callable, theta: Tensor, ts: Tensor, h: Tensor, y0: tuple, ws: tuple, got: tuple,
                    scheme: str) -> None:
    """Raise if a compiled block's state `got` is not the eager steps' from y0 to round-off: torch.compile guards on
    what it sees the fields read, and a value it does not guard would otherwise be frozen into the compiled code."""
    if not _allclose(got, _run_steps(step, ts, h, y0, ws, theta)[0]):
        raise RuntimeError(f"simulate(compile=...): the compiled {scheme!r} steps disagree with the eager ones at the "
                           "solve's first steps; f or g reads a value torch.compile does not guard (changed since it "
                           "compiled). Use the default traced solver (compile=False), which re-traces, or "
                           "torch._dynamo.reset() after changing it")


def _compiled_block(scheme: str, f: Field, g: Field, dg: Field | None, mode: bool | str, noise: str,
                    n_state: int, k: int, keep_path: bool = False) -> Callable:
    """bind(theta) -> block(ts (k,), h (k,), *state, *increments (k, B, m)) -> state tuple: k steps of the scheme's
    map in one torch.compile'd call (cached), unrolled, so that the elementwise work of all of them fuses into one
    pass over the state instead of a pass (or more) per step. keep_path: the tuple ends with x after each step
    (k, B, d)."""
    def make_block():
        step = step_map(scheme, f, g, dg, noise=noise)

        def block(ts, h, *a):
            y, xs = _run_steps(step, ts, h, a[:n_state], a[n_state:-1], a[-1])
            return (*y, torch.stack(xs)) if keep_path else y
        return block
    return _compile_cached((scheme, f, g, dg, mode, noise, "block", k, keep_path), make_block, mode)
