"""Monte Carlo over processes and machines: the same estimate and standard error for any number of processes.

    est = sdekit.montecarlo.expectation(f, g, x0, theta, ts, loss, paths=10**6, seed=0)   # E[L(X_T)]
    est = sdekit.montecarlo.gradient(f, g, x0, theta, ts, loss, paths=10**6, method="forward")   # dE[L]/dtheta
    est.mean, est.stderr, est.per_path_variance, est.processes, est.paths_per_process

Run the script as usual (one process), or under `accelerate launch` / `torchrun` (several processes on one or
many machines): each process runs its share of the paths and the results are reduced over accelerate's process
group (gloo on CPU, NCCL on GPUs). Three things make the answer independent of the process count:

- the noise is keyed: path b's Brownian increments (and Levy areas, and random initial states) are a pure function
  of (seed, b) (`sdekit.solvers.keyed`), so any split of the paths gives the same paths;
- the paths are cut into fixed units of `batch` consecutive paths, a function of the number of paths alone; a
  process runs whole units (unit u on process u * processes // units), so every unit is computed the same way;
- each unit gives float64 statistics (count, sum, sum of squared deviations from its own mean), gathered to every
  process and combined with exactly rounded sums (math.fsum), which do not depend on their order.

So 1, 2 or N processes give bitwise the same mean, per-path variance and standard error wherever `fn` gives each
path the same value whatever batch it runs in (tested: to 1e-9 relative on every problem, bitwise on most).

A process that dies makes the others fail instead of waiting: gloo reports the lost connection, NCCL and a hung
peer hit the process group's timeout (`processes(timeout=...)`), and torchrun / accelerate launch name the rank that
failed, its exit code and signal.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

from .solvers import Field, simulate
from .solvers.keyed import STREAM, keyed_draw, keyed_increments

__all__ = ["Processes", "processes", "Estimate", "mean", "expectation", "gradient", "units", "share", "unit_stats",
           "combine", "combine_means", "gather", "GRADIENT_METHODS", "keyed_increments", "keyed_draw"]

DEFAULT_TIMEOUT_S = 1800.0    # a collective that waits longer than this for a peer fails (the peer is lost or hung)


# --- processes ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among the launched processes: rank in [0, world), on `device`."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def processes(timeout: float = DEFAULT_TIMEOUT_S) -> Processes:
    """Join the launch's process group: under `accelerate launch` or `torchrun` (WORLD_SIZE > 1) through accelerate's
    PartialState (gloo on CPU, NCCL on GPUs), with a collective timeout of `timeout` seconds; a lone process (no
    launcher) runs alone on the CPU without accelerate. An existing group (an Accelerator made before) is reused."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Processes()
    from ._imports import require
    from .training import check_launch, launch_kwargs

    state = require("accelerate", "several Monte Carlo processes").PartialState(
        **launch_kwargs(), timeout=datetime.timedelta(seconds=timeout))
    check_launch(state.num_processes)
    return Processes(state.process_index, state.num_processes, state.device)


def gather(obj, procs: Processes) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (pickled: float64 values travel exactly)."""
    if procs.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * procs.world
    try:
        if dist.get_backend() == "gloo":      # the main process learns which ranks did not arrive, and says so
            dist.monitored_barrier(wait_all_ranks=True)
        dist.all_gather_object(out, obj)
    except RuntimeError as err:          # gloo: connection closed by the peer; NCCL: the timeout (DistBackendError)
        raise RuntimeError(f"process {procs.rank} of {procs.world}: lost a peer at the Monte Carlo reduction (a process "
                           f"was killed, failed or hangs; the main process and the launcher name it): {err}") from err
    return out


# --- units of work and their statistics ---------------------------------------------------------------------------
def default_batch(paths: int, block: int = 1024) -> int:
    """Paths per unit: about paths / 64, a multiple of `block` between 1 and 64 blocks (a function of paths alone)."""
    return min(64, max(1, math.ceil(paths / 64 / block))) * block


def units(paths: int, batch: int) -> list[tuple[int, int]]:
    """The global units [(start, stop), ...] of `batch` consecutive paths (the last one shorter)."""
    if paths < 1 or batch < 1:
        raise ValueError(f"need paths >= 1 and batch >= 1, got paths={paths}, batch={batch}")
    return [(a, min(paths, a + batch)) for a in range(0, paths, batch)]


def share(n_units: int, rank: int, world: int) -> range:
    """The units process `rank` of `world` runs: a contiguous run, the shares differing by at most one unit."""
    return range(rank * n_units // world, (rank + 1) * n_units // world)


def unit_stats(values: Tensor) -> tuple[int, Tensor, Tensor]:
    """(count, sum, sum of squared deviations from the unit's mean) of per-path values (n, *S), in float64."""
    v = values.detach().to(torch.float64)
    if v.ndim == 0 or v.shape[0] == 0:
        raise ValueError(f"per-path values must be (n, ...) with n >= 1, got shape {tuple(v.shape)}")
    s = v.sum(0)
    return v.shape[0], s.cpu(), (v - s / v.shape[0]).square().sum(0).cpu()


@dataclasses.dataclass
class Estimate:
    """A Monte Carlo mean over `paths` paths: mean, per-path variance and stderr (*S,) in float64."""
    mean: Tensor
    per_path_variance: Tensor
    stderr: Tensor
    paths: int
    processes: int = 1
    paths_per_process: list[int] = dataclasses.field(default_factory=lambda: [])

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "per_path_variance": self.per_path_variance.tolist(),
                "stderr": self.stderr.tolist(), "paths": self.paths, "processes": self.processes,
                "paths_per_process": self.paths_per_process}


def _fsum_rows(rows: Tensor) -> Tensor:
    """Exactly rounded sums over dim 0 of (K, *S) float64: independent of the order of the K rows."""
    flat = rows.reshape(rows.shape[0], -1).T.tolist()
    return torch.tensor([math.fsum(r) for r in flat], dtype=torch.float64).reshape(rows.shape[1:])


def combine(stats: list[tuple[int, Tensor, Tensor]]) -> tuple[int, Tensor, Tensor]:
    """(paths, mean, per-path variance (unbiased)) of the union of the units, from their unit_stats."""
    counts = torch.tensor([float(c) for c, _, _ in stats], dtype=torch.float64)
    n = int(counts.sum())
    mean = _fsum_rows(torch.stack([s for _, s, _ in stats])) / n
    unit_means = torch.stack([s / c for c, s, _ in stats])
    spread = counts.reshape(-1, *[1] * mean.ndim) * (unit_means - mean).square()
    m2 = _fsum_rows(torch.cat([torch.stack([q for _, _, q in stats]), spread]))
    return n, mean, m2 / max(n - 1, 1)


def combine_means(counts: list[int], means: Tensor) -> tuple[int, Tensor, Tensor]:
    """(paths, mean, per-path variance) from K >= 2 unit means (K, *S) alone (for methods that return a mean over a
    unit, not per-path values): the count-weighted mean, and sum_k n_k (mean_k - mean)^2 / (K - 1), which estimates
    the per-path variance since a mean of n_k paths has variance var / n_k."""
    if len(counts) < 2:
        raise ValueError("a variance from unit means needs at least 2 units")
    w = torch.tensor([float(c) for c in counts], dtype=torch.float64).reshape(-1, *[1] * (means.ndim - 1))
    n = int(sum(counts))
    mean = _fsum_rows(w * means.double()) / n
    return n, mean, _fsum_rows(w * (means.double() - mean).square()) / (len(counts) - 1)


def _estimate(n: int, mean: Tensor, var: Tensor, procs: Processes, per_process: list[int]) -> Estimate:
    return Estimate(mean, var, (var / n).sqrt(), n, procs.world, per_process)


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
    return _estimate(*combine(stats), procs, per_process)


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
