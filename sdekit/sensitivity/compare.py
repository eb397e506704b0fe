"""The comparison runner: every method on one problem, the same x0 and Brownian increments (and Levy areas).

Per method: the estimate of dE[L(X_T)]/dtheta, its standard error, the per-path variance, the error against the
closed form in standard errors (against the scheme's *discrete* closed form where the problem has one, else the
continuous limit; the result says which), warm wall time with the one-off cost (tracing, JIT compilation) of the
first call in its own column, and peak memory. Memory is the peak increase of the process's resident set size
during the warm call, sampled from /proc/self/statm every 2 ms (it sees torch and XLA allocations alike; allocator
caching makes it a rough figure, and small figures are below its resolution).
"""
from __future__ import annotations

import ctypes
import gc
import math
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..distributed import Processes, combine, combine_means, gather, share, unit_stats
from ..solvers import SCHEMES, get_scheme
from ..solvers.brownian_path import BrownianGrid
from ..solvers.keyed import STREAM, STREAMS, keyed_draw, keyed_increments
from . import adjoint, backprop, finite_diff, score_function
from .forward import forward
from .problems import Problem, closed_form, discrete_expectation

__all__ = ["METHODS", "METHOD_HELP", "run", "strong_errors", "measure", "group_bounds"]

METHOD_HELP = {
    "forward": "forward-mode sensitivity J = dX/dtheta along the path (traced vmapped JVP of the step map), chain "
               "rule per path; cost grows with P, memory flat in N",
    "backprop": "reverse-mode autograd through the same solve, per path (vmap over paths of grad); memory grows with N",
    "adjoint": "sdekit's native adjoint: reversible_heun rebuilds the path backwards with its exact inverse step "
               "(memory flat in N, = backprop to round-off); other schemes: checkpointed backprop; a mean gradient, "
               "so its variance comes from group means",
    "checkpoint": "checkpointed backprop (ceil(sqrt N) stored states, segments re-run with a tape); shown for "
                  "reversible_heun, where 'adjoint' is the reversible adjoint; group means",
    "adjoint_torchsde": "torchsde.sdeint_adjoint on the same increments: solves the continuous adjoint SDE backwards "
                        "with its own discretisation, so it matches backprop only up to O(h^1/2..1); group means",
    "diffrax": "JAX autodiff through diffrax.diffeqsolve on the same increments (euler, milstein, heun; diagonal "
               "noise, increasing time), per path",
    "fd_crn": "central finite differences with common random numbers (both solves on the same noise), per path",
    "fd_independent": "central finite differences with independent noise for every solve: variance ~ Var(L)/(2h^2)",
    "score_function": "likelihood ratio L(X_N) x the discrete Girsanov score of the Euler chain (drift parameters "
                      "only, scheme euler, g g^T invertible), per path",
    "score_function_baseline": "the same with the batch mean of L subtracted (a control variate)",
}
METHODS = list(METHOD_HELP)
# interop.diffrax.path_gradients jit-compiles a fresh function on every call: its every call includes compilation
_COMPILES_EVERY_CALL = ("diffrax",)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _trim() -> None:
    """Return freed heap memory to the OS (glibc), so that memory a previous call freed is not reused unseen."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], Tensor]) -> tuple[Tensor, float, int]:
    """(result, seconds, peak RSS increase in bytes) of fn()."""
    _trim()
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        th.join()
    return out, seconds, max(peak[0], _rss() - base)


def _group_means(fn: Callable[[Tensor, Tensor, Tensor | None], Tensor], x0: Tensor, dW: Tensor, H: Tensor | None,
                 bounds: list[tuple[int, int]]) -> Tensor:
    """A method that only returns a mean gradient, run on each of this process's path groups (local row ranges):
    (groups, P)."""
    return torch.stack([fn(x0[a:b], dW[:, a:b], None if H is None else H[:, a:b]) for a, b in bounds])


def _noise_dim(problem: Problem, x0: Tensor) -> int:
    if problem.noise == "diagonal":
        return x0.shape[1]
    with torch.no_grad():
        return problem.g(torch.tensor(problem.t0, dtype=x0.dtype), x0[:1], problem.theta).shape[-1]


_FD_STREAM = 8     # keyed streams of fd_independent's fresh noise: 8 + 2 j (dW) and 9 + 2 j (Levy area) for solve j


def _fd_independent(f, g, x0: Tensor, theta: Tensor, ts: Tensor, loss, h: float, scheme: str, noise: str,
                    fresh: Callable[[int], tuple[Tensor, Tensor | None]]) -> Tensor:
    """Central differences of L with independent noise for each of the 2P solves (solve j reads fresh(j)): (B, P)."""
    from ..solvers import simulate

    cols = []
    for p in range(theta.shape[0]):
        vals = []
        for j, sign in ((2 * p, 1.0), (2 * p + 1, -1.0)):
            th = theta.detach().clone()
            th[p] += sign * h
            w, lv = fresh(j)
            vals.append(loss(simulate(f, g, x0, th, ts, w, scheme, noise=noise, levy_area=lv)))
        cols.append((vals[0] - vals[1]) / (2 * h))
    return torch.stack(cols, -1)


def group_bounds(paths: int, groups: int) -> list[tuple[int, int]]:
    """The global path groups [(start, stop), ...]: `groups` contiguous runs whose sizes differ by at most one."""
    return [(j * paths // groups, (j + 1) * paths // groups) for j in range(groups)]


def run(problem: Problem, paths: int | None = None, steps: int | None = None, scheme: str = "euler", seed: int = 0,
        fd_h: float = 1e-3, methods: list[str] | None = None, groups: int = 20, progress: bool = True,
        procs: Processes | None = None) -> dict:
    """Every method on the problem; returns a dict of plain numbers (JSON-ready). paths/steps default to the
    problem's own (`Problem.paths`, `Problem.steps`).

    The noise (x0 where random, dW, Levy areas, fd_independent's fresh noise) is keyed by path
    (`sdekit.solvers.keyed`), and the paths are cut into `groups` groups; under several processes (procs, from
    `sdekit.distributed.processes()`) each process runs whole groups and the per-group float64 statistics are
    combined exactly, so estimates, standard errors and per-path variances are those of one process (to round-off)
    on every process. Times and memory are the slowest process's (`seconds_per_process` has each one's).
    """
    procs = Processes() if procs is None else procs
    methods = METHODS if methods is None else methods
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected a subset of {METHODS}")
    sch = get_scheme(scheme)
    sch.check_noise(problem.noise, scheme)
    paths = problem.paths if paths is None else paths
    steps = problem.steps if steps is None else steps
    if paths < 2 * groups:
        groups = max(2, paths // 2)
    if groups < procs.world:
        raise ValueError(f"{groups} path groups for {procs.world} processes: each process runs whole groups; "
                         f"pass groups (--groups) >= {procs.world} (and paths >= 2 x groups)")
    bounds = group_bounds(paths, groups)
    mine = list(share(groups, procs.rank, procs.world))
    lo, hi = bounds[mine[0]][0], bounds[mine[-1]][1]
    local_bounds = [(a - lo, b - lo) for a, b in (bounds[j] for j in mine)]
    ts = problem.ts(steps)
    x0 = keyed_draw(lambda n, gen: problem.x0(n, gen), lo, hi, seed, stream=STREAM["x0"])
    t = ts.to(x0.dtype)
    m = _noise_dim(problem, x0)
    noise_in = keyed_increments(t, lo, hi, m, seed, levy_area=sch.needs_levy_area)
    dW, H = noise_in if sch.needs_levy_area else (noise_in, None)
    f, g, theta, loss, noise = problem.drift(scheme), problem.g, problem.theta, problem.loss, problem.noise
    kw = dict(noise=noise, levy_area=H)
    increasing = bool(ts[-1] > ts[0])
    chunk = max(1, 200_000 // steps)                        # backprop's vmap chunk: tape of at most ~2e5 path-steps

    def fresh(j: int):
        if _FD_STREAM + 2 * j + 1 >= STREAMS:
            raise ValueError(f"fd_independent draws 2 P = {2 * theta.shape[0]} noise streams; at most "
                             f"{(STREAMS - _FD_STREAM) // 2} keyed streams are available")
        w = keyed_increments(t, lo, hi, m, seed, levy_area=sch.needs_levy_area, stream=_FD_STREAM + 2 * j)
        return w if sch.needs_levy_area else (w, None)

    def forward_est():
        x, J = forward(f, g, x0, theta, ts, dW, scheme, save="end", **kw)
        dL = torch.func.vmap(torch.func.grad(lambda xb: loss(xb[None])[0]))(x)      # (B, d)
        return torch.einsum("bd,bdp->bp", dL, J)

    def means(backend):
        def one(a, w, h_):
            return adjoint.mean_gradient(f, g, a, theta, ts, w, loss, scheme, noise=noise, levy_area=h_,
                                         backend=backend)
        return lambda: _group_means(one, x0, dW, H, local_bounds)

    sf_skip = ("needs scheme=euler (the Euler chain's Gaussian transition density)" if scheme != "euler" else
               "the problem has no drift-only parameters" if not problem.drift_params else None)
    diffrax_skip = ("no JAX version of this problem's fields" if problem.xp_fields is None else
                    f"scheme {scheme} not wired (euler, milstein, heun)" if scheme not in ("euler", "milstein", "heun") else
                    "diffrax's replay here needs increasing time" if not increasing else None)
    runners: dict[str, tuple[Callable[[], Tensor], str] | str] = {
        "forward": (forward_est, "per-path"),
        "backprop": ((lambda: backprop.path_gradients(f, g, x0, theta, ts, dW, loss, scheme, chunk_size=chunk, **kw)),
                     "per-path"),
        "adjoint": (means("native"), "group-means"),
        "checkpoint": (means("checkpoint"), "group-means") if sch.inverse is not None else
        "the same computation as 'adjoint' for this scheme (no exact inverse step: the native adjoint is checkpointed)",
        "adjoint_torchsde": (means("torchsde"), "group-means") if not sch.needs_levy_area
        else "torchsde replays given increments without Levy areas, which srk needs",
        "diffrax": ((lambda: _diffrax(problem, x0, theta, ts, dW, scheme)), "per-path") if diffrax_skip is None else diffrax_skip,
        "fd_crn": ((lambda: finite_diff.path_gradients(f, g, x0, theta, ts, dW, loss, fd_h, scheme, **kw)), "per-path"),
        "fd_independent": ((lambda: _fd_independent(f, g, x0, theta, ts, loss, fd_h, scheme, noise, fresh)),
                           "per-path"),
        "score_function": ((lambda: score_function.path_gradients(f, g, x0, theta, ts, dW, loss, noise=noise)), "per-path")
        if sf_skip is None else sf_skip,
        "score_function_baseline": ((lambda: score_function.path_gradients(f, g, x0, theta, ts, dW, loss, baseline=True,
                                                                          noise=noise)), "per-path")
        if sf_skip is None else sf_skip,
    }
    cf = closed_form(problem, scheme, ts)
    continuous = problem.exact_grad(theta).tolist() if problem.exact_grad is not None else None
    reference = None if cf is None else cf[1].double()
    counts = [b - a for a, b in bounds]
    out = {"problem": problem.name, "description": problem.description, "paths": paths, "steps": steps,
           "scheme": scheme, "sde_type": sch.sde_type, "noise": noise, "reverse_time": problem.reverse_time,
           "t0": problem.t0, "t1": problem.t1, "seed": seed, "fd_h": fd_h, "groups": groups,
           "processes": procs.world,
           "paths_per_process": [sum(counts[j] for j in share(groups, r, procs.world)) for r in range(procs.world)],
           "param_names": problem.param_names, "theta": theta.tolist(),
           "closed_form_kind": None if cf is None else cf[0], "closed_form": None if cf is None else cf[1].tolist(),
           "continuous_limit": continuous,
           "exact": None if cf is None else cf[1].tolist(),
           "memory": "peak RSS increase of the warm call (/proc/self/statm, 2 ms sampling)",
           "threads": torch.get_num_threads(), "methods": {}}
    for name in tqdm(methods, desc=f"sensitivity {problem.name}", disable=not (progress and procs.is_main)):
        spec = runners[name]
        if isinstance(spec, str):
            out["methods"][name] = {"skipped": spec}
            continue
        fn, kind = spec
        local: dict = {}
        try:
            if name in _COMPILES_EVERY_CALL:                         # no warm call to be had: one call, no one-off column
                est, seconds, mem = measure(fn)
                cold = None
            else:
                _, cold, _ = measure(fn)                            # first call: includes tracing / compiling
                est, seconds, mem = measure(fn)                     # warm call: what a repeated solve costs
            est = est.double()
            local = {"seconds": seconds, "one_off": None if cold is None else max(0.0, cold - seconds), "mem": mem,
                     "stats": ([unit_stats(est[a:b]) for a, b in local_bounds] if kind == "per-path" else est.cpu())}
        except (ValueError, ImportError, NotImplementedError, RuntimeError) as err:
            local = {"error": f"{type(err).__name__}: {err}"[:400]}
        parts = gather(local, procs)                                # every process, in rank (= group) order
        failed = [p["error"] for p in parts if "error" in p]
        if failed:
            out["methods"][name] = {"skipped": failed[0]}
            continue
        if kind == "group-means":               # the spread of the group means, scaled to one path
            n, mean, per_path_var = combine_means(counts, torch.cat([p["stats"] for p in parts]))
        else:
            n, mean, per_path_var = combine([s for p in parts for s in p["stats"]])
        se = (per_path_var / n).sqrt()
        one_offs = [p["one_off"] for p in parts]
        row = {"estimate": mean.tolist(), "stderr": se.tolist(), "per_path_variance": per_path_var.tolist(),
               "seconds": max(p["seconds"] for p in parts),
               "one_off_seconds": None if one_offs[0] is None else max(one_offs),
               "peak_bytes": max(p["mem"] for p in parts), "variance_from": kind}
        if procs.world > 1:
            row["seconds_per_process"] = [p["seconds"] for p in parts]
        if reference is not None:
            err = mean - reference
            row["error"] = err.tolist()
            # the standard error floored at round-off (1e-9 of the closed form): a method whose paths all give the
            # same derivative (a linear SDE with additive noise) is not flagged for disagreeing in the last digits
            row["z"] = [float(e / max(float(s), 1e-9 * abs(float(r)))) if max(float(s), abs(float(r))) > 0 else 0.0
                        for e, s, r in zip(err, se, reference)]
        out["methods"][name] = row
    return out


def _diffrax(problem: Problem, x0, theta, ts, dW, scheme):
    from ..interop.diffrax import path_gradients  # imports JAX, or names the [jax] extra
    return path_gradients(problem.xp_fields, x0, theta, ts, dW, problem.loss, scheme)


def strong_errors(problem: Problem, paths: int = 1000, finest: int = 1024, levels: int = 6, seed: int = 0,
                  schemes: tuple[str, ...] | None = None) -> dict:
    """Mean |J_h(T) - J_exact(T)| on one fine Brownian path per sample (a BrownianGrid, with Levy areas for srk),
    read on coarser grids; for every scheme that takes the problem's noise type unless `schemes` is given.

    Returns {"steps": [...], "h": [...], scheme: {"errors": [...], "slope": fitted log-log slope in h, "order": nominal}}.
    """
    if problem.exact_J is None:
        raise ValueError(f"problem {problem.name!r} has no closed-form pathwise derivative")
    schemes = tuple(n for n, s in SCHEMES.items() if problem.noise in s.orders) if schemes is None else schemes
    gen = torch.Generator().manual_seed(seed)
    x0 = problem.x0(paths, gen)
    ts_fine = problem.ts(finest)
    path = BrownianGrid.draw(ts_fine, (paths, _noise_dim(problem, x0)), gen, levy_area=True)
    T = problem.t1 - problem.t0
    _, J_exact = problem.exact_J(x0, problem.theta, T, path.increments(ts_fine).sum(0))
    steps = [finest // 2**k for k in range(levels)][::-1]
    out: dict = {"steps": steps, "h": [abs(T) / n for n in steps]}
    for scheme in schemes:
        errs = []
        for n in steps:
            _, J = forward(problem.drift(scheme), problem.g, x0, problem.theta, problem.ts(n), scheme=scheme, save="end",
                           bm=path, noise=problem.noise)
            errs.append(float((J - J_exact).abs().mean()))
        out[scheme] = {"errors": errs, "slope": _slope(out["h"], errs), "order": SCHEMES[scheme].order(problem.noise)}
    return out


def _slope(h: list[float], err: list[float]) -> float:
    lx = torch.tensor([math.log(v) for v in h], dtype=torch.float64)
    ly = torch.tensor([math.log(v) for v in err], dtype=torch.float64)
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def discrete_bias(problem: Problem, scheme: str, steps: int) -> list[float] | None:
    """The scheme's discretisation bias of the gradient: discrete closed form minus continuous limit (P,)."""
    if not problem.linear or problem.exact_grad is None:
        return None
    th = problem.theta.detach().clone().requires_grad_(True)
    gd = torch.autograd.grad(discrete_expectation(problem, scheme, problem.ts(steps), th), th)[0]
    return (gd - problem.exact_grad(problem.theta)).tolist()
