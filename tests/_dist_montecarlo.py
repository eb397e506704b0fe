"""Worker for tests/test_montecarlo_distributed.py: the Monte Carlo entry points on this process's share, and
(optionally) the `sdekit sensitivity` command, under a launcher or alone.

    python tests/_dist_montecarlo.py OUT [--kill-rank R | --stop-rank R] [--timeout S] [--sensitivity ARGS...]

Writes OUT/rank<r>.json: the estimates, and the path ranges this process evaluated. --kill-rank R: process R
SIGKILLs itself in the middle of its share; --stop-rank R: it SIGSTOPs itself (a hung process); the others must
fail naming it, not wait (--timeout: the process group's timeout, default 60 s).
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch

import sdekit
from sdekit import montecarlo
from sdekit.estimators.report import variance_sweep
from sdekit.sensitivity.problems import make_problem


def problems_run(procs, kill_rank=None, sig=signal.SIGKILL) -> dict:
    """E[X_T] of GBM (fixed x0) and dE[L]/dtheta of the reverse-time Gaussian sampler (random keyed x0)."""
    gbm = make_problem("gbm")
    ts = gbm.ts(8)
    ranges = []

    def values(a, b):
        ranges.append([a, b])
        if kill_rank == procs.rank and len(ranges) == 2:
            os.kill(os.getpid(), sig)
        dW = montecarlo.keyed_increments(ts, a, b, 1, 3)
        return torch.sigmoid(gbm.loss(sdekit.simulate(gbm.f, gbm.g, gbm.x0(b - a), gbm.theta, ts, dW)))[:, None]

    out = {"rank": procs.rank, "world": procs.world}
    out["mean"] = montecarlo.mean(values, 5000, batch=500, procs=procs).to_dict()
    out["ranges"] = ranges
    x0 = torch.ones(1, dtype=torch.float64)
    out["expectation"] = montecarlo.expectation(gbm.f, gbm.g, x0, gbm.theta, ts, gbm.loss, 3000, seed=1, batch=256,
                                                procs=procs).to_dict()
    dg = make_problem("diffusion")
    out["gradient"] = montecarlo.gradient(dg.f, dg.g, lambda n, gen: dg.x0(n, gen), dg.theta, dg.ts(10), dg.loss, 2000,
                                          method="forward", seed=2, batch=300, procs=procs).to_dict()
    # the estimators' variance sweep: cells shared out, every row on every process
    out["sweep"] = variance_sweep(("gaussian_diag", "exponential"), ("sinusoidal",), (1, 2, 4), 500, detect=False,
                                  progress=False, procs=procs)
    return out


if __name__ == "__main__":
    out_dir, args = Path(sys.argv[1]), sys.argv[2:]
    kill, sig, timeout = None, signal.SIGKILL, 60.0
    while args[:1] in (["--kill-rank"], ["--stop-rank"], ["--timeout"]):
        if args[0] == "--timeout":
            timeout = float(args[1])
        else:
            kill, sig = int(args[1]), (signal.SIGKILL if args[0] == "--kill-rank" else signal.SIGSTOP)
        args = args[2:]
    procs = montecarlo.processes(timeout=timeout)
    result = problems_run(procs, kill, sig)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{procs.rank}.json").write_text(json.dumps(result))
    if args[:1] == ["--sensitivity"]:
        from sdekit.commands.sensitivity import main
        sys.exit(main(args[1:]))
