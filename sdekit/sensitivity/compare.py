"""The comparison runner: every method on one problem, the same x0 and Brownian increments.

Per method: the estimate of dE[L(X_T)]/dtheta, its standard error, the per-path variance, the error
against the closed form, wall time and peak memory. Memory is the peak increase of the process's
resident set size, sampled from /proc/self/statm every 2 ms while the method runs (it sees torch and
XLA allocations alike; allocator caching makes it a rough figure).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from . import adjoint, backprop, finite_diff, score_function
from ..solvers import SCHEMES, brownian_increments
from .forward import forward
from .problems import Problem

__all__ = ["METHODS", "run", "strong_errors", "measure"]

METHODS = ["forward", "backprop", "adjoint", "diffrax", "fd_crn", "fd_independent", "score_function",
           "score_function_baseline"]


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def measure(fn: Callable[[], Tensor]) -> tuple[Tensor, float, int]:
    """(result, seconds, peak RSS increase in bytes) of fn()."""
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


def _batch_means(fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, dW: Tensor, groups: int) -> Tensor:
    """A method that only returns a mean gradient, run on `groups` disjoint path groups: (groups, P)."""
    idx = torch.arange(x0.shape[0]).chunk(groups)
    return torch.stack([fn(x0[i], dW[:, i]) for i in idx])


def run(problem: Problem, paths: int = 10000, steps: int = 200, scheme: str = "euler", seed: int = 0,
        fd_h: float = 1e-3, methods: list[str] | None = None, groups: int = 20, progress: bool = True) -> dict:
    """Every method on the problem; returns a dict of plain numbers (JSON-ready)."""
    methods = METHODS if methods is None else methods
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected a subset of {METHODS}")
    gen = torch.Generator().manual_seed(seed)
    x0 = problem.x0(paths, gen)
    ts = problem.ts(steps)
    dW = brownian_increments(ts, tuple(x0.shape), gen)
    f, g, theta, loss = problem.drift(scheme), problem.g, problem.theta, problem.loss
    forward_time = ts[-1] > ts[0]
    drift_ok = len(problem.drift_params) > 0 and scheme == "euler"
    fd_gen = torch.Generator().manual_seed(seed + 1)

    def forward_est():
        x, J = forward(f, g, x0, theta, ts, dW, scheme, save="end")
        dL = torch.func.vmap(torch.func.grad(lambda xb: loss(xb[None])[0]))(x)      # (B, d)
        return torch.einsum("bd,bdp->bp", dL, J)

    runners: dict[str, tuple[Callable[[], Tensor], str] | str] = {
        "forward": (forward_est, "per-path"),
        "backprop": ((lambda: backprop.path_gradients(f, g, x0, theta, ts, dW, loss, scheme)), "per-path"),
        "adjoint": ((lambda: _batch_means(lambda a, w: adjoint.mean_gradient(f, g, a, theta, ts, w, loss), x0, dW, groups),
                     "batch-means") if forward_time and scheme == "euler" else "needs increasing ts and scheme=euler"),
        "diffrax": ((lambda: _diffrax(problem, x0, theta, ts, dW, scheme)), "per-path") if problem.xp_fields is not None and scheme != "heun"
        else "no JAX version of this problem's fields" if problem.xp_fields is None else "scheme=heun not wired",
        "fd_crn": ((lambda: finite_diff.path_gradients(f, g, x0, theta, ts, dW, loss, fd_h, scheme)), "per-path"),
        "fd_independent": ((lambda: finite_diff.path_gradients(f, g, x0, theta, ts, dW, loss, fd_h, scheme, crn=False,
                                                               generator=fd_gen)), "per-path"),
        "score_function": ((lambda: score_function.path_gradients(f, g, x0, theta, ts, dW, loss)), "per-path")
        if drift_ok else "no drift-only parameters or scheme != euler",
        "score_function_baseline": ((lambda: score_function.path_gradients(f, g, x0, theta, ts, dW, loss, baseline=True)),
                                    "per-path") if drift_ok else "no drift-only parameters or scheme != euler",
    }
    exact = problem.exact_grad(theta).tolist() if problem.exact_grad is not None else None
    out = {"problem": problem.name, "description": problem.description, "paths": paths, "steps": steps,
           "scheme": scheme, "seed": seed, "fd_h": fd_h, "param_names": problem.param_names[:16],
           "theta": theta.tolist(), "exact": exact, "memory": "peak RSS increase (/proc/self/statm, 2 ms sampling)",
           "methods": {}}
    for name in tqdm(methods, desc=f"sensitivity {problem.name}", disable=not progress):
        spec = runners[name]
        if isinstance(spec, str):
            out["methods"][name] = {"skipped": spec}
            continue
        fn, kind = spec
        est, seconds, mem = measure(fn)
        est = est.double()
        n = est.shape[0]
        mean = est.mean(0)
        var = est.var(0)
        if kind == "batch-means":               # variance of one group mean, scaled to one path
            per_path_var, se = var * (paths / n), (var / n).sqrt()
        else:
            per_path_var, se = var, (var / n).sqrt()
        row = {"estimate": mean.tolist(), "stderr": se.tolist(), "per_path_variance": per_path_var.tolist(),
               "seconds": seconds, "peak_bytes": mem, "variance_from": kind}
        if exact is not None:
            row["error"] = (mean - torch.tensor(exact, dtype=mean.dtype)).tolist()
        out["methods"][name] = row
    return out


def _diffrax(problem: Problem, x0, theta, ts, dW, scheme):
    from ..interop.diffrax import path_gradients  # imports JAX, or names the [jax] extra
    return path_gradients(problem.xp_fields, x0, theta, ts, dW, problem.loss, scheme)


def strong_errors(problem: Problem, paths: int = 1000, finest: int = 1024, levels: int = 6, seed: int = 0,
                  schemes: tuple[str, ...] = ("euler", "milstein", "heun")) -> dict:
    """Mean |J_h(T) - J_exact(T)| on one fine Brownian path per sample, coarsened by summing increments.

    Returns {"steps": [...], scheme: {"errors": [...], "slope": fitted log-log slope in h, "order": nominal}}.
    """
    if problem.exact_J is None:
        raise ValueError(f"problem {problem.name!r} has no closed-form pathwise derivative")
    gen = torch.Generator().manual_seed(seed)
    x0 = problem.x0(paths, gen)
    ts_fine = problem.ts(finest)
    dW_fine = brownian_increments(ts_fine, tuple(x0.shape), gen)
    T = problem.t1 - problem.t0
    _, J_exact = problem.exact_J(x0, problem.theta, T, dW_fine.sum(0))
    steps = [finest // 2**k for k in range(levels)][::-1]
    out: dict = {"steps": steps, "h": [T / n for n in steps]}
    for scheme in schemes:
        errs = []
        for n in steps:
            dW = dW_fine.reshape(n, finest // n, *x0.shape).sum(1)
            _, J = forward(problem.drift(scheme), problem.g, x0, problem.theta, problem.ts(n), dW, scheme, save="end")
            errs.append(float((J - J_exact).abs().mean()))
        slope = _slope(out["h"], errs)
        out[scheme] = {"errors": errs, "slope": slope, "order": SCHEMES[scheme].strong_order}
    return out


def _slope(h: list[float], err: list[float]) -> float:
    lx = torch.tensor([math.log(v) for v in h], dtype=torch.float64)
    ly = torch.tensor([math.log(v) for v in err], dtype=torch.float64)
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())
