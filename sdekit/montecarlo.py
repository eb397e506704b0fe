"""Monte Carlo over processes and machines: the same estimate and standard error for any number of processes.

    est = sdekit.montecarlo.expectation(f, g, x0, theta, ts, loss, paths=10**6, seed=0)   # E[L(X_T)]
    est = sdekit.montecarlo.gradient(f, g, x0, theta, ts, loss, paths=10**6, method="forward")   # dE[L]/dtheta
    est.mean, est.stderr, est.per_path_variance, est.processes, est.paths_per_process

Run the script as usual (one process), or under `accelerate launch` / `torchrun` (several processes on one or
many machines): each process runs its share of the paths and the results are reduced over accelerate's process
group (gloo on CPU, NCCL on GPUs). Three things make the answer independent of the process count:

- the noise is keyed: path b's Brownian increments (and Levy areas, and random initial states) are a pure function
  of (seed, b) (`sdekit.solvers.keyed`), so any split of the paths gives the same paths;
- the paths are cut into fixed units of `batch` consecutive paths, a function of the number of paths alone, and
  each process runs a contiguous run of whole units, so every unit is computed the same way whoever runs it;
- each unit gives float64 statistics (count, sum, sum of squared deviations from its own mean), gathered to every
  process and combined with exactly rounded sums (math.fsum), which do not depend on their order
  (`sdekit.distributed`).

So 1, 2 or N processes give the same mean, per-path variance and standard error, bitwise wherever the per-path
values of a unit are computed deterministically (tests/test_montecarlo_distributed.py checks 1e-9 relative with 2
real processes; the numbers there come out bitwise equal).

A process that dies makes the others fail instead of waiting: gloo reports the lost connection, NCCL and a hung
peer hit the process group's timeout (`processes(timeout=...)`), and torchrun / accelerate launch name the rank that
failed, its exit code and signal.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .distributed import (
    Estimate,
    Processes,
    combine,
    combine_means,
    default_batch,
    gather,
    processes,
    share,
    unit_stats,
    units,
)
from .solvers import Field, simulate
from .solvers.keyed import STREAM, keyed_draw, keyed_increments

__all__ = ["mean", "expectation", "gradient", "GRADIENT_METHODS", "Estimate", "Processes", "processes",
           "keyed_increments", "keyed_draw", "units", "share", "unit_stats", "combine", "combine_means", "gather",
           "default_batch"]


# --- the entry points ---------------------------------------------------------------------------------------------
def mean(fn: Callable[[int, int], Tensor], paths: int, *, batch: int | None = None, procs: Processes | None = None,
         progress: bool = False) -> Estimate:
    """The Monte Carlo mean of fn's per-path values over the global paths [0, paths), on every launched process.

    fn(start, stop) -> (stop - start, *S): the values of the paths [start, stop), drawn from keyed noise (e.g.
    `sdekit.solvers.keyed.keyed_increments(ts, start, stop, m, seed)`) so that they do not depend on the split.
    batch: paths per unit of work (default `default_batch(paths)`; the answer depends on it only through the
    round-off of fn). procs: this process's place (default `processes()`). Returns the same Estimate on every process.
    """
    procs = processes() if procs is None else procs
    all_units = units(paths, default_batch(paths) if batch is None else batch)
    mine = [all_units[u] for u in share(len(all_units), procs.rank, procs.world)]
    from tqdm import tqdm

    local = []
    for a, b in tqdm(mine, desc="Monte Carlo", unit="unit", disable=not (progress and procs.is_main)):
        values = fn(a, b)
        if not isinstance(values, Tensor) or values.ndim < 1 or values.shape[0] != b - a:
            raise ValueError(f"fn({a}, {b}) must return per-path values ({b - a}, ...), got "
                             f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}")
        local.append(unit_stats(values))
    gathered = gather(local, procs)
    stats = [s for part in gathered for s in part]
    per_process = [sum(c for c, _, _ in part) for part in gathered]
    n, mu, var = combine(stats)
    return Estimate(mu, var, (var / n).sqrt(), n, procs.world, per_process)


def _x0_rows(x0, start: int, stop: int, seed: int, device: torch.device) -> Tensor:
    """Initial states of the paths [start, stop): x0 (d,) for every path, (paths, d) indexed by path, or a draw
    x0(n, generator) -> (n, d) keyed by path."""
    if callable(x0):
        return keyed_draw(x0, start, stop, seed, stream=STREAM["x0"], device=device)
    if x0.ndim == 1:
        return x0.expand(stop - start, x0.shape[0]).clone()
    return x0[start:stop]


def _noise_dim(g: Field, x: Tensor, theta: Tensor, ts: Tensor, noise: str) -> int:
    from .sensitivity._common import noise_dim

    return noise_dim(g, x, theta, ts, noise)


def _check_x0(x0, paths: int) -> None:
    if isinstance(x0, Tensor) and not (x0.ndim == 1 or (x0.ndim == 2 and x0.shape[0] == paths)):
        raise ValueError(f"x0 must be (d,) (every path), (paths={paths}, d) or a draw x0(n, generator) -> (n, d); "
                         f"got shape {tuple(x0.shape)}")


def _noise(f: Field, g: Field, x0, theta: Tensor, ts: Tensor, scheme: str, noise: str, seed: int):
    """solve_inputs(start, stop) -> (x, dW, H): the keyed initial states and noise of the paths [start, stop)."""
    from .solvers import get_scheme

    levy = get_scheme(scheme).needs_levy_area
    m: list[int] = []

    def inputs(a: int, b: int):
        x = _x0_rows(x0, a, b, seed, theta.device)
        if not m:
            m.append(_noise_dim(g, x, theta, ts, noise))
        w = keyed_increments(ts.to(x.dtype), a, b, m[0], seed, levy_area=levy)
        return (x, *w) if levy else (x, w, None)
    return inputs


def expectation(f: Field, g: Field, x0, theta: Tensor, ts: Tensor, loss: Callable[[Tensor], Tensor], paths: int, *,
                seed: int = 0, scheme: str = "euler", noise: str = "diagonal", batch: int | None = None,
                procs: Processes | None = None, progress: bool = False, **simulate_kwargs) -> Estimate:
    """E[loss(X_T)] over `paths` keyed paths of `sdekit.simulate(f, g, x0, theta, ts, dW, scheme, noise=...)`.

    x0: (d,) for every path, (paths, d), or a draw x0(n, generator) -> (n, d) (keyed by path). loss: (B, d) -> (B,)
    or (B, k). Estimate.mean: () or (k,). Same answer on any number of processes (see the module docstring).
    """
    _check_x0(x0, paths)
    inputs = _noise(f, g, x0, theta, ts, scheme, noise, seed)

    def fn(a: int, b: int) -> Tensor:
        x, dW, H = inputs(a, b)
        with torch.no_grad():
            return loss(simulate(f, g, x, theta, ts, dW, scheme, noise=noise, levy_area=H, **simulate_kwargs))
    return mean(fn, paths, batch=batch, procs=procs, progress=progress)


GRADIENT_METHODS = ("forward", "backprop", "fd_crn", "score_function")


def gradient(f: Field, g: Field, x0, theta: Tensor, ts: Tensor, loss: Callable[[Tensor], Tensor], paths: int, *,
             method: str = "forward", seed: int = 0, scheme: str = "euler", noise: str = "diagonal", fd_h: float = 1e-3,
             batch: int | None = None, procs: Processes | None = None, progress: bool = False) -> Estimate:
    """dE[loss(X_T)]/dtheta (P,) from per-path gradients over `paths` keyed paths, by a per-path method of
    `sdekit.sensitivity`: "forward" (forward sensitivities), "backprop", "fd_crn" (central differences, step fd_h,
    common noise) or "score_function" (Euler chain, drift parameters). loss: (B, d) -> (B,)."""
    from . import sensitivity

    if method not in GRADIENT_METHODS:
        raise ValueError(f"unknown gradient method {method!r}; expected one of {list(GRADIENT_METHODS)}")
    _check_x0(x0, paths)
    inputs = _noise(f, g, x0, theta, ts, scheme, noise, seed)

    def fn(a: int, b: int) -> Tensor:
        x, dW, H = inputs(a, b)
        kw = dict(noise=noise, levy_area=H)
        if method == "forward":
            xT, J = sensitivity.forward(f, g, x, theta, ts, dW, scheme, save="end", **kw)
            dL = torch.func.vmap(torch.func.grad(lambda xb: loss(xb[None])[0]))(xT)        # (B, d)
            return torch.einsum("bd,bdp->bp", dL, J)
        if method == "backprop":
            return sensitivity.backprop.path_gradients(f, g, x, theta, ts, dW, loss, scheme, **kw)
        if method == "fd_crn":
            return sensitivity.finite_diff.path_gradients(f, g, x, theta, ts, dW, loss, fd_h, scheme, **kw)
        if scheme != "euler":
            raise ValueError(f"the score-function estimator is the Euler chain's: needs scheme='euler', got {scheme!r}")
        return sensitivity.score_function.path_gradients(f, g, x, theta, ts, dW, loss, noise=noise)
    return mean(fn, paths, batch=batch, procs=procs, progress=progress)
