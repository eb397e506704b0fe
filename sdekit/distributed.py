"""The launched processes and the exact reduction of their Monte Carlo statistics.

`processes()` joins the process group a launcher (`accelerate launch`, `torchrun`) set up, through accelerate
(gloo on CPU, NCCL on GPUs), with a collective timeout; a lone process needs neither. Work is cut into fixed units
(`units`), a function of the problem size alone, and each process runs a contiguous run of whole units (`share`).
Each unit's per-path values become float64 statistics (`unit_stats`: count, sum, sum of squared deviations from the
unit's mean); every process gathers all of them (`gather`) and combines them with exactly rounded sums
(`combine`, `combine_means`), which do not depend on their order, so any number of processes gives the numbers of
one process. `sdekit.montecarlo` and `sdekit.sensitivity.compare` build on this.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os

import torch
from torch import Tensor

__all__ = ["Processes", "processes", "gather", "default_batch", "units", "share", "unit_stats", "Estimate", "combine",
           "combine_means", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0    # a collective that waits longer than this for a peer fails (the peer is lost or hung)


# --- processes ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among the launched processes: rank in [0, world), on `device`; a reduction waits at most
    `timeout` seconds for the others."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    timeout: float = DEFAULT_TIMEOUT_S

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
    return Processes(state.process_index, state.num_processes, state.device, timeout)


def _store():
    """The process group's key-value store (the launcher's rendezvous), or None where torch does not expose it."""
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _absent(store, key: str, world: int) -> list[int] | None:
    """The ranks that did not mark `key` in the store (None when the store cannot be read: its host is gone)."""
    try:
        return [r for r in range(world) if not store.check([f"{key}/{r}"])]
    except (RuntimeError, ValueError):
        return None


_reductions = itertools.count()


def gather(obj, procs: Processes) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (pickled: float64 values travel exactly).

    Each process marks its arrival in the group's store first, so that when a peer is lost (gloo: the connection
    closes; a hung peer or NCCL: the group's timeout) the error names the ranks that never arrived."""
    if procs.world == 1:
        return [obj]
    import torch.distributed as dist

    key, store = f"sdekit/reduction/{next(_reductions)}", _store()
    if store is not None:
        store.set(f"{key}/{procs.rank}", "1")
    out: list = [None] * procs.world
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as err:          # gloo: connection closed by the peer; NCCL: the timeout (DistBackendError)
        absent = None if store is None else _absent(store, key, procs.world)
        who = (f"process(es) {', '.join(map(str, absent))} of {procs.world} never reached it (killed, failed or hung)"
               if absent else "a peer process stopped or stopped answering (the launcher's report names it)")
        raise RuntimeError(f"process {procs.rank} of {procs.world}: lost a peer at the Monte Carlo reduction: {who}. "
                           f"{err}") from err
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
