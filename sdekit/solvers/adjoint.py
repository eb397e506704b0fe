"""`simulate(..., adjoint=True)`: a solve whose backward pass is the native adjoint, for neural SDEs.

torchsde's `sdeint_adjoint` convention: the forward pass keeps no tape, and backpropagating through the returned
tensor fills the gradients of x0, theta and `adjoint_params` (by default every tensor requiring grad that f and g
hold: the parameters of nn.Module fields, of the modules behind bound methods, and modules or tensors in their
closures, defaults and the globals they name).

  - reversible_heun (any scheme with an exact inverse step): the reversible adjoint of Kidger, Foster, Li and Lyons
    (2021, "Efficient and accurate gradients for neural SDEs"). The forward pass keeps the final state only; the
    backward pass rebuilds the state at t_n from the state at t_{n+1} with the inverse step, then takes one
    vector-Jacobian product of the step map there, with respect to the state, theta and the parameters. The
    gradient is backprop's through the same discrete solve to round-off, in memory independent of N.
  - other schemes: checkpointed backprop: the state every ceil(N / sqrt(N)) steps is kept, and each segment is
    re-run from its checkpoint and walked backwards with one VJP per step (memory O(sqrt(N)) states).
Increments: given dW is read where it lies; a Brownian path (bm=) is queried again, chunk by chunk; drawn
increments are redrawn chunk by chunk from the generator states saved at each chunk's start (without Levy areas;
srk's drawn increments are kept), so no pass holds more than one chunk of them.

A field that reads a tensor requiring grad that is not among the differentiated inputs is refused at backward,
naming its shape (its gradient would otherwise be silently zero): pass it in adjoint_params.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .brownian import chunk_steps, normal_chunks
from .brownian_path import path_chunks
from .problem import Solve, as_state, check_parasitic, parasitic_gap, transformed
from .schemes import g_prod as g_prod_of

__all__ = ["solve_adjoint", "field_parameters"]


def solve_adjoint(solve: Solve, adjoint_params: tuple[Tensor, ...] | None) -> Tensor:
    """X at ts[-1] (B, d) or the path (N+1, B, d), differentiable by the native adjoint."""
    if transformed():
        raise ValueError("simulate(adjoint=True) under a torch.func transform: the adjoint is an autograd backward "
                         "pass; use the default solve (adjoint=False), which torch.func differentiates")
    for name, v in (("ts", solve.ts), ("dW", solve.dW), ("levy_area", solve.levy_area)):
        if v is not None and v.requires_grad:
            raise ValueError(f"simulate(adjoint=True) differentiates x0, theta and the fields' parameters, not {name}, "
                             f"which requires grad; detach it or use the default solve (adjoint=False)")
    params = field_parameters(solve.f, solve.g, solve.dg) if adjoint_params is None else tuple(adjoint_params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"adjoint_params[{i}] must be a tensor, got {type(p).__name__}")
    params = tuple(p for p in params if p is not solve.x0 and p is not solve.theta)
    return _AdjointSolve.apply(solve, solve.x0, solve.theta, *params)


def field_parameters(*fields) -> tuple[Tensor, ...]:
    """Every tensor requiring grad that the fields hold, found for certain: nn.Module fields' parameters, the
    modules behind bound methods and functools.partial, and modules or tensors in closures, defaults and the
    globals a function names (followed a few levels). Each tensor once, in the order found."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()

    def visit(obj, depth):
        if obj is None or depth < 0 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if obj.requires_grad:
                found.setdefault(id(obj), obj)
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                if p.requires_grad:
                    found.setdefault(id(p), p)
        elif isinstance(obj, types.MethodType):
            visit(obj.__self__, depth - 1)
            visit(obj.__func__, depth - 1)
        elif isinstance(obj, functools.partial):
            visit(obj.func, depth - 1)
            for v in (*obj.args, *obj.keywords.values()):
                visit(v, depth - 1)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth - 1)
                except ValueError:                       # a cell not yet assigned
                    pass
            for v in (*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()):
                visit(v, depth - 1)
            for name in obj.__code__.co_names:
                v = obj.__globals__.get(name)
                if isinstance(v, (Tensor, nn.Module, types.FunctionType)):
                    visit(v, depth - 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth - 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth - 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
            for v in vars(obj).values():
                visit(v, depth - 1)

    for fn in fields:
        visit(fn, 4)
    return tuple(found.values())


class _AdjointSolve(torch.autograd.Function):
    """forward(solve, x0, theta, *params) -> X_T or the path; backward: the native adjoint (module docstring)."""

    @staticmethod
    def forward(ctx, solve: Solve, x0: Tensor, theta: Tensor, *params: Tensor) -> Tensor:
        sch = solve.sch
        solve = _detached(solve)
        steps = _Steps(solve)
        N = solve.N
        seg = N if sch.inverse is not None else math.ceil(N / math.ceil(math.sqrt(N)))
        y, kept, xs, first_gap = solve.init(), {}, [solve.x0], None
        for n, w in steps.forward():
            if n % seg == 0:
                kept[n] = y
            y = as_state(solve.step(solve.ts[n], solve.h[n], *y, *w, solve.theta))
            if solve.save == "path":
                xs.append(y[0])
            if n == 0:
                first_gap = parasitic_gap(solve.scheme, y)
        if solve.check_finite and not bool(torch.isfinite(y[0]).all()):
            solve.raise_non_finite(torch.stack(xs) if solve.save == "path" else None)
        check_parasitic(solve.scheme, y, first_gap)
        ctx.solve, ctx.steps, ctx.kept, ctx.seg, ctx.end = solve, steps, kept, seg, y
        ctx.save_for_backward(*params)
        return torch.stack(xs) if solve.save == "path" else y[0].clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        solve, steps, params = ctx.solve, ctx.steps, ctx.saved_tensors
        ts, h, theta = solve.ts, solve.h, solve.theta
        path_grad = grad_out if solve.save == "path" else None
        end = ctx.end
        a = (path_grad[-1] if path_grad is not None else grad_out, *(torch.zeros_like(v) for v in end[1:]))
        g_theta = torch.zeros_like(theta)
        g_params = [torch.zeros_like(p) for p in params]
        inputs = (theta, *params)
        leaves = {id(v) for v in inputs}
        if solve.scheme == "reversible_heun":
            g_x0, g_theta, g_params = _reversible_heun_backward(solve, steps, end, a[0], path_grad, inputs, leaves)
            return None, g_x0, g_theta, *g_params
        inverse = solve.sch.inverse is not None
        if inverse:
            from .schemes import inverse_map
            inv = inverse_map(solve.scheme, solve.f, solve.g, noise=solve.noise)
            y = end                                                      # walked back chunk by chunk
            segments = [(s, e, None) for s, e in reversed(steps.chunk_bounds())]
        else:
            segments = [(s, min(s + ctx.seg, solve.N), ctx.kept[s]) for s in sorted(ctx.kept, reverse=True)]
        for start, stop, y_start in segments:
            w_seg = steps.segment(start, stop)                           # (stop - start) steps of increments
            if not inverse:                                              # the segment's states from its checkpoint
                states = [y_start]
                with torch.no_grad():
                    for n in range(start, stop - 1):
                        states.append(as_state(solve.step(ts[n], h[n], *states[-1], *(v[n - start] for v in w_seg),
                                                          theta)))
            for n in range(stop - 1, start - 1, -1):
                w = tuple(v[n - start] for v in w_seg)
                if inverse:
                    with torch.no_grad():
                        y = as_state(inv(ts[n], h[n], *y, *w, theta))
                else:
                    y = states.pop()
                k = len(y)
                grads = _vjp(lambda *v, n=n, w=w, k=k: as_state(solve.step(ts[n], h[n], *v[:k], *w, v[k])),
                             y, inputs, a, leaves)
                a = grads[:len(y)]
                g_theta = g_theta + grads[len(y)]
                g_params = [acc + gp for acc, gp in zip(g_params, grads[len(y) + 1:])]
                if path_grad is not None:
                    a = (a[0] + path_grad[n], *a[1:])
        # through the initial state (x0 itself, or the scheme's init at x0)
        if solve.sch.stateful:
            grads = _vjp(lambda x, th: solve.init(x, th), (solve.x0,), inputs, a, leaves)
            g_x0, g_theta = grads[0], g_theta + grads[1]
            g_params = [acc + gp for acc, gp in zip(g_params, grads[2:])]
        else:
            g_x0 = a[0]
        return None, g_x0, g_theta, *g_params


def _reversible_heun_backward(solve: Solve, steps: _Steps, end: tuple, a_x: Tensor, path_grad: Tensor | None,
                              inputs: tuple, leaves: set) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The reversible adjoint of reversible_heun with one evaluation of f and g per step (torchsde's trick).

    Step n maps (x, z, fz, gz) at t_n to (x1, z1, f1, g1) at t_{n+1}:
        z1 = 2 x - z + fz h + gz . dW,   (f1, g1) = (f, g)(t_{n+1}, z1),   x1 = x + (fz + f1) h/2 + (gz + g1) . dW/2.
    Walking back, the inverse step evaluates (f, g)(t_n, z_n) to rebuild the state at t_n; evaluated with a graph,
    that same evaluation is what step n - 1's vector-Jacobian product needs for its (f1, g1). So each step evaluates
    the fields once, and the chain rule through the step's linear parts is written out below.
    Returns (d/dx0, d/dtheta, [d/dparam]).
    """
    ts, h, noise = solve.ts, solve.h, solve.noise
    params = inputs[1:]

    def fields(t, z):
        """(z leaf, theta leaf, f(t, z), g(t, z)) with a graph to z, theta and the parameters."""
        with torch.enable_grad():
            zl = z.detach().requires_grad_(True)
            th = inputs[0].detach().requires_grad_(True)
            fz, gz = solve.f(t, zl, th), solve.g(t, zl, th)
        return zl, th, fz, gz

    def pull(ev, a_f, a_g):
        """The VJP of an evaluation ev = (z, theta, f, g) with the adjoints of f and g: (a_z, a_theta, a_params)."""
        zl, th, fz, gz = ev
        _check_reads((fz, gz), {*leaves, id(zl), id(th)})
        outs = [(o, ao) for o, ao in ((fz, a_f), (gz, a_g)) if o.requires_grad]
        if not outs:
            return torch.zeros_like(zl), torch.zeros_like(th), [torch.zeros_like(p) for p in params]
        grads = torch.autograd.grad([o for o, _ in outs], (zl, th, *params), [ao for _, ao in outs], allow_unused=True)
        grads = [torch.zeros_like(v) if gr is None else gr for v, gr in zip((zl, th, *params), grads)]
        return grads[0], grads[1], grads[2:]

    def g_prod_vjp(a: Tensor, v: Tensor) -> Tensor:
        """d(G . v)/dG^T a for the noise type (G . v is linear in G)."""
        if noise == "diagonal":
            return a * v
        if noise == "scalar":
            return (a * v)[..., None]
        return a.unsqueeze(-1) * v.unsqueeze(-2)

    x1, z1, f1, g1 = (v.detach() for v in end)
    ev1 = fields(ts[-1], z1)                          # (f1, g1) with a graph: the last step's, evaluated once more
    a_x1, a_z1, a_f1, a_g1 = a_x, torch.zeros_like(z1), torch.zeros_like(f1), torch.zeros_like(g1)
    g_theta = torch.zeros_like(inputs[0])
    g_params = [torch.zeros_like(p) for p in params]
    for start, stop in reversed(steps.chunk_bounds()):
        dWs = steps.segment(start, stop)[0]
        for n in range(stop - 1, start - 1, -1):
            t, hn, dW = ts[n], h[n], dWs[n - start]
            # Rebuild the state at t_n (the inverse step), evaluating the fields at z_n with a graph.
            with torch.no_grad():
                z = 2 * x1 - z1 - f1 * hn - g_prod_of(g1, dW, noise)
            ev = fields(t, z)
            fz, gz = ev[2].detach(), ev[3].detach()
            with torch.no_grad():
                x = x1 - (fz + f1) * (0.5 * hn) - g_prod_of(gz + g1, 0.5 * dW, noise)
                # x1 = x + (fz + f1) h/2 + (gz + g1) . dW/2: the adjoints of f1 and g1 through x1
                half_a_x1 = 0.5 * a_x1
                a_f1_tot = a_f1 + half_a_x1 * hn
                a_g1_tot = a_g1 + g_prod_vjp(half_a_x1, dW)
            # (f1, g1) = (f, g)(t_{n+1}, z1)
            a_z1_f, a_th, a_p = pull(ev1, a_f1_tot, a_g1_tot)
            with torch.no_grad():
                a_z1_tot = a_z1 + a_z1_f
                g_theta += a_th
                for acc, gp in zip(g_params, a_p):
                    acc += gp
                # and z1 = 2 x - z + fz h + gz . dW (both linear in the adjoints: one op each)
                a_x = a_x1 + 2 * a_z1_tot if path_grad is None else a_x1 + 2 * a_z1_tot + path_grad[n]
                a_z = -a_z1_tot
                b = half_a_x1 + a_z1_tot
                a_fz = b * hn
                a_gz = g_prod_vjp(b, dW)
            x1, z1, f1, g1, ev1 = x, z, fz, gz, ev
            a_x1, a_z1, a_f1, a_g1 = a_x, a_z, a_fz, a_gz
    # the initial state (x0, x0, f(t0, x0), g(t0, x0)): z_0 is x0 rebuilt
    a_z0, a_th, a_p = pull(ev1, a_f1, a_g1)
    g_theta += a_th
    for acc, gp in zip(g_params, a_p):
        acc += gp
    return a_x1 + a_z1 + a_z0, g_theta, g_params


def _vjp(fn, y: tuple, inputs: tuple, a: tuple, leaves: set) -> tuple:
    """The VJP of fn(*y, theta) -> state with the adjoint a, with respect to y, theta and the parameters
    (inputs[1:], read by fn from where the fields hold them). Refuses a field that reads another tensor requiring
    grad: its gradient would be dropped."""
    with torch.enable_grad():
        yv = tuple(v.detach().requires_grad_(True) for v in y)
        th = inputs[0].detach().requires_grad_(True)
        out = fn(*yv, th)
        wanted = (*yv, th, *inputs[1:])
        _check_reads(out, {*leaves, *(id(v) for v in wanted)})
        pairs = [(o, g) for o, g in zip(out, a) if o.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(v) for v in wanted)
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    return tuple(torch.zeros_like(v) if gr is None else gr for v, gr in zip(wanted, grads))


def _check_reads(out: tuple, allowed: set) -> None:
    """Every leaf tensor requiring grad that the step read is one we differentiate (else: ValueError naming it)."""
    stack = [o.grad_fn for o in out if o.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)                # AccumulateGrad: a leaf requiring grad
        if var is not None and id(var) not in allowed:
            raise ValueError(f"simulate(adjoint=True): f or g reads a tensor of shape {tuple(var.shape)} that requires "
                             "grad but is not among the differentiated inputs (x0, theta, adjoint_params); its gradient "
                             "would be lost. Pass it in adjoint_params=, or detach it")
        stack.extend(nxt for nxt, _ in node.next_functions)


def _detached(solve: Solve) -> Solve:
    """The solve on detached x0 and theta (the forward pass keeps no tape; backward differentiates them itself)."""
    return dataclasses.replace(solve, x0=solve.x0.detach(), theta=solve.theta.detach())


class _Steps:
    """The solve's increments, walked forwards (saving what is needed to walk them again) and read back by
    segment [start, stop) for the backward pass, one chunk at a time."""

    def __init__(self, solve: Solve):
        self.solve = solve
        self.kept: Tensor | tuple | None = None          # drawn increments that cannot be redrawn by chunk (srk)
        self.states: list[tuple[int, int, Tensor]] = []  # (first step, steps, generator state) of every drawn chunk

    def forward(self) -> Iterator[tuple[int, tuple]]:
        s = self.solve
        drawn = s.dW is None and s.bpath is None
        if drawn and (s.levy or s.generator is None):
            chunks = list(s.chunks())
            self.kept = tuple(torch.cat(v) for v in zip(*chunks))
            source = iter(chunks)
        elif drawn:
            source = self._recorded(s.chunks())
        else:
            source = s.chunks()
        n = 0
        for w in source:
            for wn in zip(*w):
                yield n, wn
                n += 1

    def _recorded(self, chunks) -> Iterator[tuple]:
        gen, n = self.solve.generator, 0
        while True:
            state = gen.get_state()
            try:
                w = next(chunks)
            except StopIteration:
                return
            self.states.append((n, w[0].shape[0], state))
            n += w[0].shape[0]
            yield w

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """[start, stop) of the chunks the increments are read in: the drawn chunks, or chunk_steps-sized ones."""
        if self.states:
            return [(first, first + n) for first, n, _ in self.states]
        c = chunk_steps(self.solve.wshape)
        return [(i, min(i + c, self.solve.N)) for i in range(0, self.solve.N, c)]

    def segment(self, start: int, stop: int) -> tuple[Tensor, ...]:
        """The increments of steps [start, stop): (dW,) or (dW, H), each (stop - start, B, m)."""
        s = self.solve
        if s.dW is not None:
            return tuple(v[start:stop] for v in ((s.dW,) if not s.levy else (s.dW, s.levy_area)))
        if self.kept is not None:
            return tuple(v[start:stop] for v in self.kept)
        if s.bpath is not None:
            parts = list(path_chunks(s.bpath, s.ts[start:stop + 1], s.levy, max(stop - start, 1)))
            return tuple(torch.cat(v) for v in zip(*parts))
        return self._redrawn(start, stop)

    def _redrawn(self, start: int, stop: int) -> tuple[Tensor]:
        """Drawn increments of steps [start, stop), redrawn from the saved generator state of each chunk."""
        s = self.solve
        gen = torch.Generator(device=s.generator.device)
        out = []
        for first, n, state in self.states:
            if first + n <= start or first >= stop:
                continue
            gen.set_state(state)
            z = next(normal_chunks(n, s.wshape, gen, s.x0.dtype, s.x0.device))
            dw = z * s.h[first:first + n].detach().abs().sqrt()[:, None, None]
            out.append(dw[max(start - first, 0):stop - first])
        return (torch.cat(out),)

