"""`simulate(compile=...)`: the scheme's step map compiled with torch.compile, `BLOCK` steps per compiled call.

Correctness rests on torch.compile's own guards: dynamo guards what the compiled code read (closures, globals,
attributes, module parameters and buffers, containers) and recompiles when one changes; parameters and buffers
are inputs of the compiled graph, so their current values (and gradients, under autograd) are always used.
On top of that, the first compiled block of every solve is compared with the eager steps, and disagreement is a
RuntimeError. Except under CUDA graphs ("reduce-overhead"), `BLOCK` = 8 steps are unrolled into one compiled
call, so that their elementwise work fuses into one pass over the state per block (a cheap field's solve then
costs little more than drawing its normals, which are drawn in place into the block's buffer when no gradient is
taken); the last steps of a solve that do not fill a block run one per call. After a one-off compile of seconds
to tens of seconds it pays off for cheap fields on large batches (on CPU a network drift ran slower compiled than
eagerly: inductor's tanh is slower than torch's there).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._tracing import _allclose
from .brownian import chunk_steps
from .problem import CHECK_EVERY, Solve, as_state, per_step, run_steps
from .schemes import step_map

__all__ = ["solve_compiled", "compiled_step", "BLOCK"]

BLOCK = 8   # steps per compiled call (not under CUDA graphs)
_COMPILED: dict = {}


def compiled_step(solve: Solve, mode: bool | str) -> Callable:
    """run(t, h, *state, *increments) -> state: the step map compiled (cached per fields and mode), theta bound."""
    key = (solve.scheme, solve.f, solve.g, solve.dg, mode, solve.noise)
    fn = _compile_cached(key, lambda: step_map(solve.scheme, solve.f, solve.g, solve.dg, noise=solve.noise), mode)
    return fn(solve.theta)


def _compile_cached(key: tuple, make_fn: Callable[[], Callable], mode: bool | str) -> Callable:
    """bind(theta) -> fn(t, h, *a) = compiled(t, h, *a, theta), compiled once per key with torch.compile."""
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(make_fn(), dynamic=False, **({} if mode is True else {"mode": mode}))
    return lambda theta: (lambda t, hn, *a: fn(t, hn, *a, theta))


def _compiled_block(solve: Solve, mode: bool | str, n_state: int, k: int, keep_path: bool) -> Callable:
    """block(ts (k,), h (k,), *state, *increments (k, B, m)) -> state tuple (+ x after each step (k, B, d) if
    keep_path): k steps of the scheme's map in one compiled call (cached), unrolled, so that the elementwise work
    of all of them fuses into one pass over the state."""
    def make_block():
        step = step_map(solve.scheme, solve.f, solve.g, solve.dg, noise=solve.noise)

        def block(ts, h, *a):
            y, xs = run_steps(step, ts, h, a[:n_state], a[n_state:-1], a[-1])
            return (*y, torch.stack(xs)) if keep_path else y
        return block
    key = (solve.scheme, solve.f, solve.g, solve.dg, mode, solve.noise, "block", k, keep_path)
    return _compile_cached(key, make_block, mode)(solve.theta)


def _check_compiled(solve: Solve, ts: Tensor, h: Tensor, y0: tuple, ws: tuple, got: tuple) -> None:
    """Raise if a compiled block's state `got` is not the eager steps' from y0 to round-off."""
    with torch.no_grad():
        want = run_steps(solve.step, ts, h, tuple(v.detach() for v in y0), ws, solve.theta.detach())[0]
        if not _allclose(tuple(v.detach() for v in got), want):
            raise RuntimeError(f"simulate(compile=...): the compiled {solve.scheme!r} steps disagree with the eager "
                               "ones at the solve's first steps; f or g reads a value torch.compile does not guard "
                               "(changed since it compiled). Use the eager solver (compile=False), or "
                               "torch._dynamo.reset() after changing it")


def solve_compiled(solve: Solve, mode: bool | str) -> Tensor:
    """The compiled loop: X at ts[-1] (B, d), or the path (N+1, B, d). Under autograd (torch.is_grad_enabled())
    the compiled code tapes whatever requires grad, and increments are never drawn into reused buffers (the tape
    may hold them)."""
    graphs = isinstance(mode, str) and "reduce-overhead" in mode
    if graphs and torch.is_grad_enabled():
        raise ValueError("simulate(compile='reduce-overhead') replays CUDA graphs, which take no gradient: run it under "
                         "torch.no_grad(), or use compile=True")
    taped = torch.is_grad_enabled()
    ts, h, x0 = solve.ts, solve.h, solve.x0
    n_state = len(solve.sch.state_names) if solve.sch.stateful else 1
    run = compiled_step(solve, mode)
    xs = [x0]
    y, n, checked, verified = solve.init(), 0, 0, False
    ok = torch.ones((), dtype=torch.bool, device=x0.device)

    def record(y_in, y_out, t, hn, w):
        nonlocal verified
        if not verified:                      # the first block (or step) of every solve against the eager steps
            _check_compiled(solve, t, hn, y_in, w, y_out[:n_state])
            verified = True

    if graphs:
        for w in solve.chunks():
            for t, hn, *wn in per_step(ts[n:n + w[0].shape[0]], h[n:n + w[0].shape[0]], *w):
                torch.compiler.cudagraph_mark_step_begin()
                y_in, y = y, tuple(v.clone() for v in as_state(run(t, hn, *y, *wn)))
                record(y_in, y, ts[n:n + 1], h[n:n + 1], tuple(v[None] for v in wn))
                n += 1
                if solve.save == "path":
                    xs.append(y[0])
    else:
        c = chunk_steps(solve.wshape)
        k = BLOCK if c >= BLOCK else c * -(-BLOCK // c)            # several whole chunks when a chunk is short
        buf = None
        if (not taped and c < k and solve.dW is None and solve.bpath is None and not solve.levy
                and (solve.generator is None or solve.generator.device == x0.device)):
            buf = torch.empty((k, *solve.wshape), dtype=x0.dtype, device=x0.device)   # drawn where the block reads it
        chunks = solve.chunks(out=buf)
        block = _compiled_block(solve, mode, n_state, k, solve.save == "path")
        for w in _blocks(chunks, k, None if buf is None else (buf,), reuse=not taped):
            if w[0].shape[0] == k:
                y_in, out = y, block(ts[n:n + k], h[n:n + k], *y, *w)
                y = tuple(out[:n_state])
                record(y_in, y, ts[n:n + k], h[n:n + k], w)
                if solve.save == "path":
                    xs.extend(out[n_state].unbind(0))
                n += k
            else:                                                 # the last few steps
                for t, hn, *wn in per_step(ts[n:], h[n:], *w):
                    y_in, y = y, as_state(run(t, hn, *y, *wn))
                    record(y_in, y, ts[n:n + 1], h[n:n + 1], tuple(v[None] for v in wn))
                    n += 1
                    if solve.save == "path":
                        xs.append(y[0])
            if solve.check_finite and n - checked >= CHECK_EVERY:
                ok, checked = ok & torch.isfinite(y[0].detach()).all(), n
    x = y[0]
    path = torch.stack(xs) if solve.save == "path" else None
    if solve.check_finite and not bool(ok & torch.isfinite(x.detach()).all()):
        solve.raise_non_finite(path)
    return path if path is not None else (x.clone() if x is x0 else x)


def _blocks(chunks: Iterator[tuple[Tensor, ...]], k: int, buf: tuple[Tensor, ...] | None = None,
            reuse: bool = True) -> Iterator[tuple[Tensor, ...]]:
    """The increments of `chunks` (tuples of (c, B, m) tensors, c varying) regrouped into tuples of exactly k steps
    (the last may have fewer): views of a chunk where it holds the k steps, else copies into a buffer (one reused
    buffer if `reuse`, valid until the next tuple is taken; `buf`, (k, B, m) each, if given: steps already in
    place are not copied)."""
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
                if not reuse:
                    buf = None
    if fill:
        yield tuple(b[:fill] for b in buf)
