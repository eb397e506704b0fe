"""`simulate`, the one primal SDE solver: a scheme's one-step map (`schemes`) run along a time grid.

`simulate` checks its inputs, gathers them into a `Solve` (`problem`) and hands it to one driver:
  - the eager loop below (the default): the step map called step by step, exactly as a plain torch loop would,
    so autograd tapes whatever f and g read that requires grad (module parameters, closures, globals, x0,
    theta), and every call sees the fields' current values. Nothing is cached between solves.
  - `traced` (trace=True): the step traced once into straight-line code, under a purity contract like jax.jit's.
  - `compiled` (compile=True or a torch.compile mode): BLOCK steps per torch.compile'd call, on dynamo's guards.
  - `adaptive` (adaptive=True): step doubling on a Brownian path.
  - `adjoint` (adjoint=True): the eager forward pass without a tape, and a backward pass by the native adjoint.
Brownian increments, when not given, are drawn as standard normals in chunks of steps sized to stay in cache
(`brownian.normal_chunks`), scaled by sqrt(|h|) once per chunk. A scheme's state may be more than x
(reversible_heun carries (x, z, f, g)); x, its first entry, is what the solve returns and saves.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .adaptive import check_scheme, integrate_adaptive
from .brownian_path import resolve_path
from .problem import CHECK_EVERY, Solve, as_state, check_parasitic, parasitic_gap, per_step, transformed
from .schemes import Field, check_inputs, get_scheme

__all__ = ["simulate", "per_step"]


def simulate(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None = None,
             scheme: str = "euler", generator: torch.Generator | None = None, *, noise: str = "diagonal",
             levy_area: Tensor | None = None, save: str = "end", dg: Field | None = None, compile: bool | str = False,
             trace: bool = False, check_finite: bool = True, bm=None, adaptive: bool = False, rtol: float = 1e-3,
             atol: float = 1e-6, dt0: float | None = None, dt_min: float | None = None, max_steps: int = 100_000,
             return_info: bool = False, adjoint: bool = False,
             adjoint_params: tuple[Tensor, ...] | None = None) -> Tensor | tuple[Tensor, dict]:
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
    save: "end" (memory independent of N) or "path".
    The default solve is the eager loop: the step map called step by step, as a plain torch loop would, so autograd
    is honoured always: whatever f and g read that requires grad (x0, theta, module parameters and buffers,
    closures, globals, attributes) gets its gradient, and every solve reads the fields' current values.
    trace=True runs the step traced once into straight-line aten code (faster for cheap fields on small batches),
    under a purity contract like jax.jit's: f and g are pure functions of (t, x, theta); anything else they read
    is frozen when the trace is made (the cached trace is re-checked against the eager step at one point per solve,
    which catches most changes, not all) and gets no gradient (fields that read tensors requiring grad are refused;
    a solve that differentiates x0 or theta runs eagerly). compile: False, True, or a torch.compile mode
    ("reduce-overhead" uses CUDA graphs on GPU, without gradients), compiled once per (f, g, dg, mode): BLOCK = 8
    steps per compiled call, torch.compile's guards recompiling when what the fields read changes (module
    parameters are graph inputs); the first compiled block of every solve is compared with the eager steps, and
    compiled code that disagrees is a RuntimeError.
    adjoint=True (torchsde's sdeint_adjoint convention): the forward pass keeps no tape, and the backward pass of
    the returned tensor runs the native adjoint (`solvers.adjoint`: reversible_heun rebuilds the path backwards
    with its exact inverse step, memory independent of N; other schemes checkpointed backprop), filling the
    gradients of x0, theta and adjoint_params (default: every tensor requiring grad that f and g hold: module
    parameters, closed-over tensors; a field reading one that is not among them is an error at backward).
    Non-finite x0, theta, ts, dW or levy_area are a ValueError naming the argument and the first bad index; a
    solution that becomes non-finite is a FloatingPointError naming the step, its times and the sample
    (a flag accumulated on the device every few steps, read once per solve). dW and levy_area are scanned
    only then (a NaN increment makes the path non-finite), so given increments cost no extra pass.
    check_finite=False returns the result as it is, unchecked. reversible_heun (eager and adjoint solves) warns
    (RuntimeWarning) when the gap between its two half-states x and z grew 1000-fold since the first step and ends
    larger than |x|: its parasitic mode grew (its step is stable only where the linearised drift is oscillatory,
    lambda h on the imaginary axis; a dissipative lambda grows it like exp(|lambda| t)), so the answer is not to be
    trusted: a finer grid or another scheme is.

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
    if sch.needs_levy_area and dW is not None and levy_area is None:
        raise ValueError(f"scheme {scheme!r} reads the space-time Levy area of every step, which dW alone does not "
                         f"carry: pass levy_area= (N, B, m), H = U/|h| - dW/2 in torchsde's terms, N(0, |h|/12) and "
                         f"independent of dW; or neither dW nor levy_area, to draw both from generator")
    if levy_area is not None and dW is None:
        raise ValueError("levy_area= goes with dW= (the increments it belongs to); without dW both are drawn")
    _check_modes(adaptive, adjoint, adjoint_params, trace, compile)
    if adaptive:
        check_scheme(scheme, noise)
    x0 = x0.contiguous()     # an expanded x0 (one row for all paths) can carry no tangent (milstein's JVP)
    gen = generator if generator is not None or dW is not None or bpath is not None else _default_generator(x0.device)
    solve = Solve(scheme, sch, f, g, dg, noise, x0, theta, ts, m, save, check_finite, dW=dW, levy_area=levy_area,
                  bpath=bpath, generator=gen,
                  gen_state=gen.get_state() if gen is not None and dW is None and bpath is None and check_finite else None)
    if adaptive:
        return _adaptive(solve, compile=compile, rtol=rtol, atol=atol, dt0=dt0, dt_min=dt_min, max_steps=max_steps,
                         return_info=return_info)
    if adjoint and torch.is_grad_enabled():
        from .adjoint import solve_adjoint
        out = solve_adjoint(solve, adjoint_params)
    elif compile:
        from .compiled import solve_compiled
        out = solve_compiled(solve, compile)
    elif trace and not _differentiates(x0, theta, ts, dW, levy_area):
        from .traced import check_pure, solve_traced
        check_pure(solve)
        out = solve_traced(solve)
    else:
        out = solve_eager(solve)
    N = ts.shape[0] - 1
    return (out, {"accepted": N, "rejected": 0, "step_evaluations": N}) if return_info else out


def solve_eager(solve: Solve) -> Tensor:
    """The plain loop: one call of the step map per step, out of place, in the caller's autograd mode.
    X at ts[-1] (B, d), or the path (N+1, B, d)."""
    ts, h, theta = solve.ts, solve.h, solve.theta
    check = solve.check_finite and not transformed()
    y, n, checked = solve.init(), 0, 0
    xs, first_gap = [y[0]], None
    ok = torch.ones((), dtype=torch.bool, device=solve.x0.device)
    for w in solve.chunks():
        c = w[0].shape[0]
        for t, hn, *wn in per_step(ts[n:n + c], h[n:n + c], *w):
            y = as_state(solve.step(t, hn, *y, *wn, theta))
            n += 1
            if solve.save == "path":
                xs.append(y[0])
            if n == 1:
                first_gap = parasitic_gap(solve.scheme, y)
        if check and n - checked >= CHECK_EVERY:
            ok, checked = ok & torch.isfinite(y[0].detach()).all(), n
    path = torch.stack(xs) if solve.save == "path" else None
    if check and not bool(ok & torch.isfinite(y[0].detach()).all()):
        solve.raise_non_finite(path)
    check_parasitic(solve.scheme, y, first_gap)
    return path if path is not None else y[0]


def _differentiates(*tensors: Tensor | None) -> bool:
    """Whether a gradient is taken through these inputs (autograd, or a torch.func transform)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(v is not None and (wrapped(v) or (torch.is_grad_enabled() and v.requires_grad)) for v in tensors)


def _check_modes(adaptive: bool, adjoint: bool, adjoint_params, trace: bool, compile) -> None:
    if adjoint and (adaptive or trace or compile):
        other = "adaptive=True" if adaptive else "trace=True" if trace else "compile="
        raise ValueError(f"adjoint=True runs its own eager forward and backward passes; it does not combine with {other}")
    if adjoint_params is not None and not adjoint:
        raise ValueError("adjoint_params= names what adjoint=True differentiates; pass adjoint=True with it")


def _adaptive(solve: Solve, *, compile, rtol, atol, dt0, dt_min, max_steps, return_info):
    """simulate(adaptive=True): the step (eager, or compiled with compile=) driven by step doubling
    (`adaptive.integrate_adaptive`)."""
    levy = solve.levy
    if compile:
        from .compiled import compiled_step
        run = compiled_step(solve, compile)
    else:
        run = lambda t, hn, *a: solve.step(t, hn, *a, solve.theta)        # noqa: E731

    def one(t, hn, y, dw, H):
        return run(t, hn, *as_state(y), *((dw, H) if levy else (dw,)))
    y0 = solve.init()
    y0 = y0 if solve.sch.stateful else y0[0]
    x, info = integrate_adaptive(one, y0, solve.ts, solve.bpath, order=solve.sch.order(solve.noise), levy=levy,
                                 rtol=rtol, atol=atol, dt0=dt0, dt_min=dt_min, max_steps=max_steps, save=solve.save)
    info["bm"] = solve.bpath
    return (x, info) if return_info else x


def _default_generator(device: torch.device) -> torch.Generator | None:
    """The generator torch.randn(device=device) draws from when given none (so its state can be saved and forked)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None
